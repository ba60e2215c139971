-- place_bids judges a batch by the time its statement starts, not its
-- transaction's. With a bid lane (`--bid-lanes`, on by default) a batch's
-- transaction begins while the batch waits for the lane, and bids that arrive
-- meanwhile join it; `now()`, the transaction's start, was then earlier than
-- their arrival. A bid that reached gavel after its auction's end was taken as
-- in time (and, with anti-sniping, pushed the end out again), and one that came
-- just after the start was refused as too early. `statement_timestamp()` is
-- when `place_bids` was called, after every bid of its batch had arrived: it
-- decides open or closed, anti-sniping's window and a buy-now's end, and it is
-- now each recorded bid's `created_at`, which was the transaction's start too.
--
-- And an auction a buy-now closed is announced whole (`auction`) inside the
-- batch's transaction, before its `ended`: until now its closed state travelled
-- only in the batch's announcement, sent after the commit and lost if gavel
-- died in between, and the `ended` that did arrive carries no state, so the
-- other cores' caches and event streams kept it open.
--
-- Nothing else changes from the previous version (20261130000004).

create or replace function place_bids(
    p_auction     bigint[],
    p_bidder      bigint[],
    p_amount      bigint[],
    p_max         bigint[],
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
    bid_count    bigint,
    closed       boolean,
    outbid       bigint,
    high_bid     bigint,
    high_bidder  bigint
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
    -- The leader's maximum before the current bid.
    lmax     bigint;
    r        bids;
    -- What the batch writes once, at the end: whole rows, one append per bid and
    -- per auction (appending each column to an array of its own cost a statement
    -- per column, and PL/pgSQL's cost is per statement).
    up_id    bigint[] := '{}';
    up       auctions[] := '{}';
    ins      bids[] := '{}';
    -- Auctions a buy-now closed, to announce as `ended` after the writes.
    sold     auctions[] := '{}';
begin
    if n = 0 then
        return;
    end if;
    -- Bids by auction id, then in the order sent. gavel sends them sorted by
    -- auction already (src/db/bids.rs), so `visit` stays null and bid k is the
    -- k-th; anything else is sorted here.
    for k in 2 .. n loop
        if p_auction[k] < p_auction[k - 1] then
            select array_agg(s order by p_auction[s], s) into visit from generate_subscripts(p_auction, 1) as s;
            exit;
        end if;
    end loop;
    -- Probed through the primary key (`= any`), whatever the table's size: an
    -- anti-join here is planned as a scan of all accounts.
    select array_agg(distinct b) into unknown
      from unnest(p_bidder) as b
     where b <> all (array(select x.id from accounts x where x.id = any(p_bidder)));
    -- Locked as they are fetched, in id order (the sort is below the lock).
    open locked for select * from auctions x where x.id = any(p_auction) order by x.id for update;

    -- One step past the last bid, so that the last auction's state is kept by the
    -- same code as every other's.
    for k in 1 .. n + 1 loop
        i := coalesce(visit[k], k);
        if k > n or p_auction[i] is distinct from cur then
            if changed then
                up_id := up_id || a.id;
                up := up || a;
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
        closed := null;
        outbid := null;
        high_bid := null;
        high_bidder := null;

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
                high_bid := (c.claimed_result ->> 'high_bid')::bigint;
                return next;
                continue;
            end if;
        end if;

        if not exists_a then
            outcome := 'not_found';
        elsif a.status = 'closed' or statement_timestamp() < a.starts_at or statement_timestamp() >= a.ends_at then
            outcome := 'closed';
            ends_at := a.ends_at;
        elsif p_amount[i] < coalesce(a.high_bid + a.min_increment, a.reserve) then
            outcome := 'too_low';
            min_next_bid := coalesce(a.high_bid + a.min_increment, a.reserve);
            ends_at := a.ends_at;
        elsif a.high_bidder = p_bidder[i] and p_max[i] is not null then
            -- The leader raises its maximum: nothing anyone else sees changes. Its
            -- leading bid (of this batch, or already recorded) keeps the new one.
            a.high_max := greatest(coalesce(a.high_max, a.high_bid), p_max[i]);
            changed := true;
            for k in reverse coalesce(array_length(ins, 1), 0) .. 1 loop
                r := ins[k];
                if r.auction_id = a.id and r.bidder_id = p_bidder[i] then
                    r.max_amount := a.high_max;
                    ins[k] := r;
                    bid_id := r.id;
                    exit;
                end if;
            end loop;
            if bid_id is null then
                update bids x set max_amount = a.high_max
                 where x.id = (select y.id from bids y
                                where y.auction_id = a.id and y.bidder_id = p_bidder[i]
                                order by y.id desc limit 1)
                returning x.id into bid_id;
            end if;
            outcome := 'accepted';
            amount := a.high_bid;
            min_next_bid := a.high_bid + a.min_increment;
            ends_at := a.ends_at;
            high_bid := a.high_bid;
            high_bidder := a.high_bidder;
        else
            -- The visible price changes: the bid is recorded, and leads or is
            -- answered by the leader's proxy.
            lmax := coalesce(a.high_max, a.high_bid);
            bid_id := nextval('bids_id_seq');
            outcome := 'accepted';
            closed := false;
            if a.buy_now is not null and coalesce(a.high_bid, 0) < a.reserve and p_amount[i] >= a.buy_now then
                -- Buy-now: still on offer (no bid has reached the reserve), and this
                -- bid meets it: the bidder wins at that price, now.
                ins := ins || (bid_id, a.id, p_bidder[i], a.buy_now, null, null, false)::bids;
                outbid := nullif(a.high_bidder, p_bidder[i]);
                a.high_bid := a.buy_now;
                a.high_max := a.buy_now;
                a.high_bidder := p_bidder[i];
                a.status := 'closed';
                a.winner_id := p_bidder[i];
                a.ends_at := statement_timestamp();
                closed := true;
            elsif a.high_bidder is null or a.high_bidder = p_bidder[i] then
                -- The first bid, or the leader's own raise of its price.
                a.high_bid := p_amount[i];
                a.high_max := greatest(p_max[i], p_amount[i], lmax);
                a.high_bidder := p_bidder[i];
                ins := ins || (bid_id, a.id, p_bidder[i], p_amount[i], null, p_max[i], false)::bids;
            elsif coalesce(p_max[i], p_amount[i]) > lmax then
                -- Above the leader's maximum: leads at the least that beats it.
                a.high_bid := greatest(p_amount[i], least(lmax + a.min_increment, coalesce(p_max[i], p_amount[i])));
                a.high_max := coalesce(p_max[i], p_amount[i]);
                outbid := a.high_bidder;
                a.high_bidder := p_bidder[i];
                ins := ins || (bid_id, a.id, p_bidder[i], a.high_bid, null, p_max[i], a.high_bid > p_amount[i])::bids;
            else
                -- Not above the leader's maximum: recorded, then answered.
                ins := ins || (bid_id, a.id, p_bidder[i], p_amount[i], null, p_max[i], false)::bids;
                a.high_bid := least(coalesce(p_max[i], p_amount[i]) + a.min_increment, lmax);
                if a.high_bid > p_amount[i] then
                    ins := ins || (nextval('bids_id_seq'), a.id, a.high_bidder, a.high_bid, null, lmax, true)::bids;
                    a.bid_count := a.bid_count + 1;
                end if;
                outbid := p_bidder[i];
                outcome := 'outbid';
            end if;
            if a.extend_secs > 0 and a.ends_at - statement_timestamp() <= make_interval(secs => a.extend_secs) and not closed then
                a.ends_at := a.ends_at + make_interval(secs => a.extend_secs);
            end if;
            a.bid_count := a.bid_count + 1;
            a.version := a.version + 1;
            changed := true;
            if outcome = 'accepted' then
                amount := a.high_bid;
            end if;
            if closed then
                sold := sold || a;
            end if;
            min_next_bid := a.high_bid + a.min_increment;
            ends_at := a.ends_at;
            version := a.version;
            bid_count := a.bid_count;
            high_bid := a.high_bid;
            high_bidder := a.high_bidder;
        end if;

        if p_key[i] is not null then
            perform remember_idempotency_key(p_bidder[i], 'bid', p_key[i], p_fingerprint[i], outcome,
                jsonb_build_object('bid_id', bid_id, 'amount', amount, 'high_bid', high_bid,
                                   'min_next_bid', min_next_bid, 'ends_at', ends_at));
        end if;
        return next;
    end loop;
    close locked;

    if array_length(up_id, 1) > 0 then
        -- One statement for both writes.
        with changed as (
            update auctions x
               set high_bid = u.high_bid,
                   high_bidder = u.high_bidder,
                   high_max = u.high_max,
                   bid_count = u.bid_count,
                   version = u.version,
                   ends_at = u.ends_at,
                   status = u.status,
                   winner_id = u.winner_id
              from unnest(up) as u
             -- `= any` lets the plan find the rows by primary key; joined on `u.id`
             -- alone, a small table is scanned whole.
             where x.id = any(up_id)
               and x.id = u.id
        )
        insert into bids (id, auction_id, bidder_id, amount, created_at, max_amount, proxy) overriding system value
        select b.id, b.auction_id, b.bidder_id, b.amount, statement_timestamp(), b.max_amount, b.proxy
          from unnest(ins) as b;
    end if;

    -- Rare: only an auction's first bid can meet its buy-now price.
    for k in 1 .. coalesce(array_length(sold, 1), 0) loop
        -- The closed auction whole, as its row trigger sends any change but a
        -- bid: the batch's announcement comes after the commit, and is lost if
        -- gavel dies first, and a closed auction has no next change to catch up
        -- on. This transaction notifies already (`ended`), so its commit costs
        -- no more.
        perform pg_notify('gavel_cache', auction_json(sold[k]));
        perform pg_notify('gavel_cache', json_build_object(
            'kind', 'ended',
            'at_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint,
            'auction_id', sold[k].id,
            'winner_id', sold[k].winner_id,
            'high_bid', sold[k].high_bid,
            'version', sold[k].version,
            'bidders', array(select distinct b.bidder_id from bids b where b.auction_id = sold[k].id)
        )::text);
    end loop;
end
$$;
