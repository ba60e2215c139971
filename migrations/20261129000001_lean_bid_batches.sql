-- A lean, set-based place_bids, and bid notifications once per batch, after it.
--
-- The first place_bids ran one conditional update and one insert per bid, checked
-- the bidder's account per bid, and its update fired the row trigger, which built
-- the auction's whole JSON (auction_json, a `language sql` function that
-- PostgreSQL plans anew on every call) and sent one notification per bid. Called
-- with one-element arrays it managed 2.25K calls/s where the plain single-bid
-- statement managed 7.7K (pgbench, 4 clients, same cluster).
--
-- This one does per batch what it did per bid:
--   * one existence check of the batch's bidders;
--   * one `select … for update` that locks the batch's auctions in id order (so
--     concurrent batches, from any core or instance, lock in one order and cannot
--     deadlock), after which every bid is decided in memory against the locked
--     row, in arrival order per auction: the same conditions the conditional
--     update had (open by the database's clock, amount ≥ the minimum next bid);
--   * one update of every auction the batch changed, one insert of every accepted
--     bid (ids drawn from the identity sequence while the row lock is held, so a
--     later accepted bid on an auction always has a larger id);
--   * no notification: the caller announces the batch's final state of each
--     auction it changed, once, right after the commit (src/db/bids.rs says why
--     not here: a notifying transaction holds a cluster-wide lock through its
--     commit's WAL flush, so notifying batches commit one at a time).
--
-- Only the database accepts: the decision is made here, under the row lock.

-- A change that takes a bid is announced by whoever placed it, once per batch
-- (gavel's bid batcher, after place_bids below): the row trigger announces every
-- other change. A bid is the only change that moves bid_count.
drop trigger auctions_notify on auctions;

create trigger auctions_notify_insert
    after insert on auctions
    for each row execute function auctions_notify();

create trigger auctions_notify_update
    after update on auctions
    for each row
    when (old.bid_count = new.bid_count)
    execute function auctions_notify();

-- The same document as before, now planned once per session: PL/pgSQL keeps the
-- plan of its expression, a `language sql` function is planned on every call.
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
        'version', a.version
    )::text;
end
$$;

drop function place_bids(bigint[], bigint[], bigint[], text[], text[]);

-- Places a batch of bids and returns one outcome per bid, tagged with its position
-- in the batch (`ord`, from 1). For an accepted bid, `version` and `bid_count` are
-- the auction's state right after it (its high bid is the bid's amount, its high
-- bidder the bid's bidder), so the caller can update its cache without another
-- read. A bid whose account does not exist, whose auction does not exist, that is
-- too low or late gets its own outcome and never fails the others. With a key, the
-- outcome is stored beside the write; a key still held by a running transaction
-- answers key_in_use.
create function place_bids(
    p_auction     bigint[],
    p_bidder      bigint[],
    p_amount      bigint[],
    p_key         text[],
    p_fingerprint text[]
) returns table (
    ord          integer,
    outcome      text,
    bid_id       bigint,
    amount       bigint,
    min_next_bid bigint,
    ends_at      timestamptz,
    version      bigint,
    bid_count    bigint
)
language plpgsql
-- PL/pgSQL caches its statements' plans, but with the default plan_cache_mode it
-- keeps planning anew (custom plans) a statement whose custom plan looks cheaper
-- than the generic one, and `= any($array)` always does: with one-bid batches,
-- planning took a third of the backend's time (perf, pgbench -c 1). The generic
-- plans are index scans on the primary keys, whatever the batch.
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    n        integer := coalesce(array_length(p_auction, 1), 0);
    visit    integer[];
    unknown  bigint[];
    locked   refcursor;
    k        integer;
    i        integer;
    c        record;
    -- The auction the current bid is on, as the bids before it left it.
    cur      bigint;
    a        auctions;
    exists_a boolean := false;
    changed  boolean := false;
    -- What the batch writes once, at the end.
    up_id      bigint[] := '{}';
    up_high    bigint[] := '{}';
    up_bidder  bigint[] := '{}';
    up_count   bigint[] := '{}';
    up_version bigint[] := '{}';
    up_ends    timestamptz[] := '{}';
    ins_id     bigint[] := '{}';
    ins_auct   bigint[] := '{}';
    ins_bidder bigint[] := '{}';
    ins_amount bigint[] := '{}';
begin
    if n = 0 then
        return;
    end if;
    -- Bids by auction id, then arrival.
    select array_agg(s order by p_auction[s], s) into visit from generate_subscripts(p_auction, 1) as s;
    -- Probed through the primary key (`= any`), whatever the table's size: an
    -- anti-join here is planned as a scan of all accounts.
    select array_agg(distinct b) into unknown
      from unnest(p_bidder) as b
     where b <> all (array(select x.id from accounts x where x.id = any(p_bidder)));
    -- Locked as they are fetched, in id order (the sort is below the lock). Tried
    -- instead: one statement aggregating the locked rows into arrays; it was no
    -- faster for 1 or 16 bids and 20 % slower for 64 (pgbench -c 1, alternating).
    open locked for select * from auctions x where x.id = any(p_auction) order by x.id for update;

    -- One step past the last bid, so that the last auction's state is kept by the
    -- same code as every other's.
    for k in 1 .. n + 1 loop
        i := visit[k];
        if k > n or p_auction[i] is distinct from cur then
            if changed then
                up_id := up_id || a.id;
                up_high := up_high || a.high_bid;
                up_bidder := up_bidder || a.high_bidder;
                up_count := up_count || a.bid_count;
                up_version := up_version || a.version;
                up_ends := up_ends || a.ends_at;
            end if;
            exit when k > n;
            changed := false;
            cur := p_auction[i];
            -- The next locked row is this auction, or it does not exist.
            if a.id is null or a.id < cur then
                fetch locked into a;
                if not found then
                    a := null;
                end if;
            end if;
            exists_a := coalesce(a.id = cur, false);
        end if;

        ord := i;
        outcome := null;
        bid_id := null;
        amount := p_amount[i];
        min_next_bid := null;
        ends_at := null;
        version := null;
        bid_count := null;

        if unknown is not null and p_bidder[i] = any(unknown) then
            outcome := 'unknown_account';
            return next;
            continue;
        end if;

        if p_key[i] is not null then
            select * into c from claim_idempotency_key(p_bidder[i], 'bid', p_key[i], p_fingerprint[i]);
            if c.claimed_outcome is not null then
                outcome := c.claimed_outcome;
                bid_id := (c.claimed_result ->> 'bid_id')::bigint;
                amount := coalesce((c.claimed_result ->> 'amount')::bigint, amount);
                min_next_bid := (c.claimed_result ->> 'min_next_bid')::bigint;
                ends_at := (c.claimed_result ->> 'ends_at')::timestamptz;
                return next;
                continue;
            end if;
        end if;

        if not exists_a then
            outcome := 'not_found';
        elsif a.status = 'closed' or now() < a.starts_at or now() >= a.ends_at then
            outcome := 'closed';
            ends_at := a.ends_at;
        elsif p_amount[i] < coalesce(a.high_bid + a.min_increment, a.reserve) then
            outcome := 'too_low';
            min_next_bid := coalesce(a.high_bid + a.min_increment, a.reserve);
            ends_at := a.ends_at;
        else
            -- Accepted: the only place a bid is.
            a.high_bid := p_amount[i];
            a.high_bidder := p_bidder[i];
            a.bid_count := a.bid_count + 1;
            a.version := a.version + 1;
            if a.extend_secs > 0 and a.ends_at - now() <= make_interval(secs => a.extend_secs) then
                a.ends_at := a.ends_at + make_interval(secs => a.extend_secs);
            end if;
            changed := true;
            bid_id := nextval('bids_id_seq');
            ins_id := ins_id || bid_id;
            ins_auct := ins_auct || a.id;
            ins_bidder := ins_bidder || a.high_bidder;
            ins_amount := ins_amount || a.high_bid;
            outcome := 'accepted';
            min_next_bid := a.high_bid + a.min_increment;
            ends_at := a.ends_at;
            version := a.version;
            bid_count := a.bid_count;
        end if;

        if p_key[i] is not null then
            perform remember_idempotency_key(p_bidder[i], 'bid', p_key[i], p_fingerprint[i], outcome,
                jsonb_build_object('bid_id', bid_id, 'amount', amount,
                                   'min_next_bid', min_next_bid, 'ends_at', ends_at));
        end if;
        return next;
    end loop;
    close locked;

    if array_length(up_id, 1) > 0 then
        update auctions x
           set high_bid = u.high_bid,
               high_bidder = u.high_bidder,
               bid_count = u.bid_count,
               version = u.version,
               ends_at = u.ends_at
          from unnest(up_id, up_high, up_bidder, up_count, up_version, up_ends)
               as u(id, high_bid, high_bidder, bid_count, version, ends_at)
         -- `= any` lets the plan find the rows by primary key; joined on `u.id`
         -- alone, a small table is scanned whole.
         where x.id = any(up_id)
           and x.id = u.id;
        insert into bids (id, auction_id, bidder_id, amount) overriding system value
        select * from unnest(ins_id, ins_auct, ins_bidder, ins_amount);
    end if;
end
$$;

-- The stock document, planned once per session like auction_json above.
create or replace function inventory_json(i inventory) returns text
language plpgsql stable as $$
begin
    return json_build_object(
        'kind', 'inventory',
        'at_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint,
        'sku', i.sku,
        'seller_id', i.seller_id,
        'title', i.title,
        'available', i.available,
        'reserved', i.reserved,
        'version', i.version
    )::text;
end
$$;
