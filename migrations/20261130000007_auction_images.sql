-- Item images: the seller's pictures of what an auction sells.
--
-- The bytes live in object storage, under a key of their own per upload (so a
-- replacement never overwrites what a row still names); a row here says which
-- object an image name stands for. `auctions.images` lists the names, so that
-- the auction's representation (and every cache fed by `auction_json`) shows
-- them: gavel changes it, with the version, in the transaction that changes
-- the rows.

create table auction_images (
    auction_id   bigint not null references auctions (id),
    name         text not null,
    content_type text not null,
    size         bigint not null,
    object_key   text not null,
    created_at   timestamptz not null default now(),
    primary key (auction_id, name),
    constraint auction_images_name_safe check (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    constraint auction_images_type_known check (content_type in ('image/jpeg', 'image/png', 'image/webp')),
    constraint auction_images_size_positive check (size > 0)
);

alter table auctions add column images text[] not null default '{}';

create or replace function auction_json(a auctions) returns text
language plpgsql stable as $$
begin
    return json_build_object(
        'kind', 'auction',
        'at_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint,
        'id', a.id,
        'seller_id', a.seller_id,
        'title', a.title,
        'reserve', a.reserve,
        'min_increment', a.min_increment,
        'extend_secs', a.extend_secs,
        'high_bid', a.high_bid,
        'high_bidder', a.high_bidder,
        'bid_count', a.bid_count,
        'starts_at_us', (extract(epoch from a.starts_at) * 1000000)::bigint,
        'ends_at_us', (extract(epoch from a.ends_at) * 1000000)::bigint,
        'status', a.status,
        'winner_id', a.winner_id,
        'buy_now', a.buy_now,
        'images', a.images,
        'version', a.version
    )::text;
end
$$;
