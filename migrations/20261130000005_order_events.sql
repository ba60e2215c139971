-- Order events: every order placed, cancelled or fulfilled is announced on the
-- cache channel (`order`), so that gavel can tell its buyer at once on their own
-- event stream (`GET /api/me/events`). Only the order's id, buyer and status
-- travel: the order itself can be of any size, and the buyer may read it.
--
-- Orders are placed in transactions that already notify (each reserved stock
-- row is announced by `inventory_notify`), so this adds one notification to
-- transactions that commit notifying anyway.

create function orders_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('gavel_cache', json_build_object(
        'kind', 'order',
        'at_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint,
        'order_id', new.id,
        'buyer_id', new.buyer_id,
        'status', new.status,
        'updated_us', (extract(epoch from new.updated_at) * 1000000)::bigint
    )::text);
    return null;
end
$$;

create trigger orders_notify_insert
    after insert on orders
    for each row execute function orders_notify();

create trigger orders_notify_status
    after update of status on orders
    for each row when (old.status is distinct from new.status) execute function orders_notify();
