-- Whom an accepted bid outbid: place_bids answers, for each accepted bid, the
-- bidder who led the auction until then (`outbid`; null when nobody did, or when
-- the bidder led already), so that gavel can tell that bidder at once (`GET
-- /api/me/events`). Within a batch each bid sees the leader the bids before it
-- left, so a leader displaced inside the batch is named too. The rest of
-- place_bids is the previous version's (20261130000001).

drop function place_bids(bigint[], bigint[], bigint[], text[], text[]);

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
    bid_count    bigint,
    closed       boolean,
    outbid       bigint
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
    up_status  text[] := '{}';
    up_winner  bigint[] := '{}';
    ins_id     bigint[] := '{}';
    ins_auct   bigint[] := '{}';
    ins_bidder bigint[] := '{}';
    ins_amount bigint[] := '{}';
begin
    if n = 0 then
        return;
    end if;
    -- Bids by auction id, then arrival. gavel sends them in that order already
    -- (src/db/bids.rs), so `visit` stays null and bid k is the k-th; anything else
    -- is sorted here.
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
    -- Locked as they are fetched, in id order (the sort is below the lock). Tried
    -- instead: one statement aggregating the locked rows into arrays; it was no
    -- faster for 1 or 16 bids and 20 % slower for 64 (pgbench -c 1, alternating).
    open locked for select * from auctions x where x.id = any(p_auction) order by x.id for update;

    -- One step past the last bid, so that the last auction's state is kept by the
    -- same code as every other's.
    for k in 1 .. n + 1 loop
        i := coalesce(visit[k], k);
        if k > n or p_auction[i] is distinct from cur then
            if changed then
                up_id := up_id || a.id;
                up_high := up_high || a.high_bid;
                up_bidder := up_bidder || a.high_bidder;
                up_count := up_count || a.bid_count;
                up_version := up_version || a.version;
                up_ends := up_ends || a.ends_at;
                up_status := up_status || a.status;
                up_winner := up_winner || a.winner_id;
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
            closed := a.buy_now is not null and coalesce(a.high_bid, 0) < a.reserve
                      and p_amount[i] >= a.buy_now;
            if closed then
                -- Buy-now: still on offer (no bid has reached the reserve), and
                -- this bid meets it: the bidder wins at that price, now.
                a.high_bid := a.buy_now;
                a.status := 'closed';
                a.winner_id := p_bidder[i];
                a.ends_at := now();
            else
                a.high_bid := p_amount[i];
                if a.extend_secs > 0 and a.ends_at - now() <= make_interval(secs => a.extend_secs) then
                    a.ends_at := a.ends_at + make_interval(secs => a.extend_secs);
                end if;
            end if;
            if a.high_bidder <> p_bidder[i] then
                outbid := a.high_bidder;
            end if;
            a.high_bidder := p_bidder[i];
            a.bid_count := a.bid_count + 1;
            a.version := a.version + 1;
            changed := true;
            bid_id := nextval('bids_id_seq');
            ins_id := ins_id || bid_id;
            ins_auct := ins_auct || a.id;
            ins_bidder := ins_bidder || a.high_bidder;
            ins_amount := ins_amount || a.high_bid;
            outcome := 'accepted';
            amount := a.high_bid;
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
        -- One statement for both writes.
        with changed as (
            update auctions x
               set high_bid = u.high_bid,
                   high_bidder = u.high_bidder,
                   bid_count = u.bid_count,
                   version = u.version,
                   ends_at = u.ends_at,
                   status = u.status,
                   winner_id = u.winner_id
              from unnest(up_id, up_high, up_bidder, up_count, up_version, up_ends, up_status, up_winner)
                   as u(id, high_bid, high_bidder, bid_count, version, ends_at, status, winner_id)
             -- `= any` lets the plan find the rows by primary key; joined on `u.id`
             -- alone, a small table is scanned whole.
             where x.id = any(up_id)
               and x.id = u.id
        )
        insert into bids (id, auction_id, bidder_id, amount) overriding system value
        select * from unnest(ins_id, ins_auct, ins_bidder, ins_amount);
    end if;
end
$$;
