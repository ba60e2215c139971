-- Inventory and orders. Stock moves from available to reserved when ordered, and
-- out of reserved when fulfilled; it never goes negative.

create table inventory (
    sku        text primary key,
    seller_id  bigint not null constraint inventory_seller_id_fkey references accounts (id),
    title      text not null,
    available  bigint not null,
    reserved   bigint not null default 0,
    version    bigint not null default 1,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint inventory_sku_format check (sku ~ '^[A-Za-z0-9._-]{1,64}$'),
    constraint inventory_title_length check (char_length(title) between 1 and 200),
    -- Stock can never go negative: the conditional updates keep it so, and these
    -- checks make any bug that would oversell fail instead.
    constraint inventory_available_nonnegative check (available >= 0),
    constraint inventory_reserved_nonnegative check (reserved >= 0),
    constraint inventory_version_positive check (version > 0)
);

create index inventory_seller_id_sku_idx on inventory (seller_id, sku);

create table orders (
    id         bigint generated always as identity primary key,
    buyer_id   bigint not null constraint orders_buyer_id_fkey references accounts (id),
    status     text not null default 'reserved',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint orders_status_known check (status in ('reserved', 'cancelled', 'fulfilled'))
);

create index orders_buyer_id_idx on orders (buyer_id, id);

create table order_lines (
    order_id  bigint not null constraint order_lines_order_id_fkey references orders (id),
    sku       text not null constraint order_lines_sku_fkey references inventory (sku),
    seller_id bigint not null,
    quantity  bigint not null,
    constraint order_lines_pkey primary key (order_id, sku),
    constraint order_lines_quantity_positive check (quantity > 0)
);

-- An inventory row as the caches read it (the same channel as auctions).
create function inventory_json(i inventory) returns text
language sql stable as $$
    select json_build_object(
        'kind', 'inventory',
        'at_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint,
        'sku', i.sku,
        'seller_id', i.seller_id,
        'title', i.title,
        'available', i.available,
        'reserved', i.reserved,
        'version', i.version
    )::text
$$;

create function inventory_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('gavel_cache', inventory_json(new));
    return null;
end
$$;

create trigger inventory_notify
    after insert or update on inventory
    for each row execute function inventory_notify();

-- An order as clients see it, built here so that every route answers with the
-- same bytes. With p_original, as it was when placed (what an idempotent retry
-- must answer): reserved, unchanged since creation.
create function order_json(p_id bigint, p_original boolean) returns text
language sql stable as $$
    select json_build_object(
        'id', o.id,
        'buyer_id', o.buyer_id,
        'status', case when p_original then 'reserved' else o.status end,
        'lines', (select json_agg(json_build_object('sku', l.sku, 'quantity', l.quantity, 'seller_id', l.seller_id)
                                  order by l.sku)
                    from order_lines l where l.order_id = o.id),
        'created_at', to_char(o.created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'updated_at', to_char(case when p_original then o.created_at else o.updated_at end at time zone 'UTC',
                              'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    )::text
      from orders o
     where o.id = p_id
$$;

-- Places a batch of orders, each reserving stock for every line or for none,
-- and returns one outcome per order. Every sku of the batch is locked first, in
-- sku order, so batches from different cores cannot deadlock; then each order,
-- in arrival order, is checked line by line and only written if every line can
-- be met. Lines arrive flattened: p_line_order[j] is the order line j belongs to.
-- With a key, the outcome is stored beside the write, as for bids.
create function place_orders(
    p_buyer       bigint[],
    p_key         text[],
    p_fingerprint text[],
    p_line_order  integer[],
    p_sku         text[],
    p_quantity    bigint[]
) returns table (ord integer, outcome text, order_id bigint, failed_sku text, available bigint, body text)
language plpgsql as $$
declare
    c record;
    line record;
    new_id bigint;
    i integer;
begin
    perform 1 from inventory inv where inv.sku = any(p_sku) order by inv.sku for update;

    for i in 1 .. coalesce(array_length(p_buyer, 1), 0) loop
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

        if p_key[i] is not null then
            select * into c from claim_idempotency_key(p_buyer[i], 'order', p_key[i], p_fingerprint[i]);
            if c.claimed_outcome is not null then
                outcome := c.claimed_outcome;
                failed_sku := c.claimed_result ->> 'failed_sku';
                available := (c.claimed_result ->> 'available')::bigint;
                order_id := (c.claimed_result ->> 'order_id')::bigint;
                body := order_json(order_id, true);
                return next;
                continue;
            end if;
        end if;

        outcome := 'reserved';
        for line in
            select l.sku, l.quantity, inv.available as have, inv.sku is null as missing
              from unnest(p_line_order, p_sku, p_quantity) as l(o, sku, quantity)
              left join inventory inv on inv.sku = l.sku
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

-- Moves an order out of 'reserved': cancel (by its buyer) returns the stock to
-- available; fulfil (by a seller of every line) lets it leave reserved. The order
-- row is locked first, then its inventory rows in sku order. Outcomes: done,
-- not_found (also for someone else's order: existence does not leak), forbidden
-- (a seller of only some lines), or the order's current status.
create function finish_order(p_order bigint, p_actor bigint, p_action text)
returns text
language plpgsql as $$
declare
    o orders;
    lines_total integer;
    lines_mine integer;
begin
    select * into o from orders where id = p_order for update;
    if not found then
        return 'not_found';
    end if;
    if p_action = 'cancel' then
        if o.buyer_id <> p_actor then
            return 'not_found';
        end if;
    else
        select count(*), count(*) filter (where seller_id = p_actor) into lines_total, lines_mine
          from order_lines where order_id = p_order;
        if lines_mine = 0 then
            return 'not_found';
        elsif lines_mine < lines_total then
            return 'forbidden';
        end if;
    end if;
    if o.status <> 'reserved' then
        return o.status;
    end if;

    perform 1 from inventory
     where sku in (select sku from order_lines where order_id = p_order)
     order by sku
     for update;
    update inventory inv
       set available = inv.available + case when p_action = 'cancel' then l.quantity else 0 end,
           reserved = inv.reserved - l.quantity,
           version = inv.version + 1,
           updated_at = now()
      from order_lines l
     where l.order_id = p_order and inv.sku = l.sku;
    update orders
       set status = case when p_action = 'cancel' then 'cancelled' else 'fulfilled' end,
           updated_at = now()
     where id = p_order;
    return 'done';
end
$$;
