-- place_orders, two fixes; nothing else changes from its first version
-- (20261122000002).
--
-- A batch's keys are claimed before its stock rows are locked. A retry of a
-- keyed order while the first is still in the database named the same skus, so
-- its batch waited on the first's row locks before it reached the key, and got
-- the replay (or a timeout) instead of DESIGN.md's 409. Now the key's try-lock
-- answers it at once; an order its key decides (in use, another body, a replay)
-- is not placed, and its skus are not locked. gavel never sends one bidder's
-- key twice in one batch (src/db/orders.rs): two claims of one session both
-- succeed, and both orders would be placed.
--
-- A batch uses the stock rows it locked, and no other. A sku created by its
-- seller after the lock but before the batch reached an order naming it passed
-- the check unlocked; another batch could then take its stock first, and the
-- batch's write broke the stock's `available >= 0` check, failing every order of
-- the batch with a 500 where the short one should have had a 409. Such a sku is
-- now unknown to the batch (422), as it was when the batch began.

create or replace function place_orders(
    p_buyer       bigint[],
    p_key         text[],
    p_fingerprint text[],
    p_line_order  integer[],
    p_sku         text[],
    p_quantity    bigint[]
) returns table (ord integer, outcome text, order_id bigint, failed_sku text, available bigint, body text)
language plpgsql as $$
declare
    n       integer := coalesce(array_length(p_buyer, 1), 0);
    c       record;
    line    record;
    new_id  bigint;
    i       integer;
    -- What each order's key decided, where it did (an order that is not placed).
    decided text[] := array_fill(null::text, array[n]);
    result  jsonb[] := array_fill(null::jsonb, array[n]);
    -- The stock rows this batch locked: the only ones it reads or writes.
    locked  text[];
begin
    for i in 1 .. n loop
        if p_key[i] is not null and exists (select 1 from accounts a where a.id = p_buyer[i]) then
            select * into c from claim_idempotency_key(p_buyer[i], 'order', p_key[i], p_fingerprint[i]);
            decided[i] := c.claimed_outcome;
            result[i] := c.claimed_result;
        end if;
    end loop;

    select coalesce(array_agg(s.sku), '{}') into locked
      from (select inv.sku from inventory inv
             where inv.sku = any(array(select l.sku from unnest(p_line_order, p_sku) as l(o, sku)
                                        where decided[l.o] is null))
             order by inv.sku
               for update) as s;

    for i in 1 .. n loop
        ord := i;
        outcome := null;
        order_id := null;
        failed_sku := null;
        available := null;
        body := null;

        if not exists (select 1 from accounts a where a.id = p_buyer[i]) then
            outcome := 'unknown_account';
            return next;
            continue;
        end if;

        if decided[i] is not null then
            outcome := decided[i];
            failed_sku := result[i] ->> 'failed_sku';
            available := (result[i] ->> 'available')::bigint;
            order_id := (result[i] ->> 'order_id')::bigint;
            body := order_json(order_id, true);
            return next;
            continue;
        end if;

        outcome := 'reserved';
        for line in
            select l.sku, l.quantity, inv.available as have, inv.sku is null as missing
              from unnest(p_line_order, p_sku, p_quantity) as l(o, sku, quantity)
              left join inventory inv on inv.sku = l.sku and inv.sku = any(locked)
             where l.o = i
             order by l.sku
        loop
            if line.missing then
                outcome := 'unknown_sku';
                failed_sku := line.sku;
                exit;
            elsif line.have < line.quantity then
                outcome := 'insufficient_stock';
                failed_sku := line.sku;
                available := line.have;
                exit;
            end if;
        end loop;

        new_id := null;
        if outcome = 'reserved' then
            insert into orders (buyer_id) values (p_buyer[i]) returning id into new_id;
            insert into order_lines (order_id, sku, seller_id, quantity)
            select new_id, l.sku, inv.seller_id, l.quantity
              from unnest(p_line_order, p_sku, p_quantity) as l(o, sku, quantity)
              join inventory inv on inv.sku = l.sku
             where l.o = i;
            update inventory inv
               set available = inv.available - l.quantity,
                   reserved = inv.reserved + l.quantity,
                   version = inv.version + 1,
                   updated_at = now()
              from unnest(p_line_order, p_sku, p_quantity) as l(o, sku, quantity)
             where l.o = i and inv.sku = l.sku;
            order_id := new_id;
            body := order_json(new_id, false);
        end if;

        if p_key[i] is not null then
            perform remember_idempotency_key(p_buyer[i], 'order', p_key[i], p_fingerprint[i], outcome,
                jsonb_build_object('order_id', new_id, 'failed_sku', failed_sku, 'available', available));
        end if;
        return next;
    end loop;
end
$$;
