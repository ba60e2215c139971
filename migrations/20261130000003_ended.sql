-- Who bid on an auction that closes: advance_auctions now announces, for each
-- auction it closes, its winner and every bidder who bid on it (`ended`, in
-- notifications of at most 500 bidders each), so that gavel can tell each of
-- them on their own event stream whether they won or lost (`GET
-- /api/me/events`). The auction's closed state is announced by its row
-- trigger, as before; opening scheduled auctions is unchanged.

create or replace function advance_auctions() returns integer
language plpgsql as $$
declare
    changed integer := 0;
    c integer;
    closed record;
    bidders bigint[];
    chunk constant integer := 500;
    k integer;
begin
    for closed in
        update auctions a
           set status = 'closed',
               winner_id = case when a.high_bid >= a.reserve then a.high_bidder end,
               version = a.version + 1
         where a.id in (select id from auctions
                         where status <> 'closed' and ends_at <= now()
                         order by id
                         for update skip locked)
           and a.ends_at <= now()
        returning a.id, a.winner_id, a.high_bid, a.version
    loop
        changed := changed + 1;
        select coalesce(array_agg(distinct b.bidder_id), '{}') into bidders from bids b where b.auction_id = closed.id;
        k := 1;
        while k <= coalesce(array_length(bidders, 1), 0) loop
            perform pg_notify('gavel_cache', json_build_object(
                'kind', 'ended',
                'at_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint,
                'auction_id', closed.id,
                'winner_id', closed.winner_id,
                'high_bid', closed.high_bid,
                'version', closed.version,
                'bidders', bidders[k:k + chunk - 1]
            )::text);
            k := k + chunk;
        end loop;
    end loop;

    update auctions a
       set status = 'open',
           version = a.version + 1
     where a.id in (select id from auctions
                     where status = 'scheduled' and starts_at <= now() and ends_at > now()
                     order by id
                     for update skip locked);
    get diagnostics c = row_count;
    return changed + c;
end
$$;
