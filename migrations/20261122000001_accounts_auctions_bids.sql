-- Accounts, auctions, bids and idempotency keys. Money is bigint minor units.
-- Every change to an auction row bumps `version` and is announced on the
-- `gavel_cache` channel with the row's new state, for the per-core caches.

create table accounts (
    id            bigint generated always as identity primary key,
    email         text not null,
    password_hash text not null,
    role          text not null,
    created_at    timestamptz not null default now(),
    constraint accounts_role_known check (role in ('bidder', 'seller', 'admin')),
    constraint accounts_email_length check (char_length(email) between 3 and 254)
);

-- E-mail addresses are unique regardless of case.
create unique index accounts_email_key on accounts (lower(email));

create table auctions (
    id            bigint generated always as identity primary key,
    seller_id     bigint not null constraint auctions_seller_id_fkey references accounts (id),
    title         text not null,
    reserve       bigint not null,
    min_increment bigint not null,
    extend_secs   integer not null default 0,
    starts_at     timestamptz not null,
    ends_at       timestamptz not null,
    status        text not null default 'scheduled',
    high_bid      bigint,
    high_bidder   bigint,
    bid_count     bigint not null default 0,
    winner_id     bigint,
    version       bigint not null default 1,
    created_at    timestamptz not null default now(),
    constraint auctions_title_length check (char_length(title) between 1 and 200),
    constraint auctions_reserve_positive check (reserve > 0),
    constraint auctions_min_increment_positive check (min_increment > 0),
    constraint auctions_extend_secs_range check (extend_secs between 0 and 3600),
    constraint auctions_window check (ends_at > starts_at),
    constraint auctions_status_known check (status in ('scheduled', 'open', 'closed')),
    constraint auctions_high_bid_positive check (high_bid is null or high_bid > 0),
    constraint auctions_high_bid_has_bidder check ((high_bid is null) = (high_bidder is null)),
    constraint auctions_bid_count_nonnegative check (bid_count >= 0),
    constraint auctions_winner_only_when_closed check (winner_id is null or status = 'closed'),
    constraint auctions_version_positive check (version > 0)
);

-- The lifecycle tick finds auctions whose time has come without scanning closed ones.
create index auctions_open_ends_at_idx on auctions (ends_at) where status <> 'closed';
create index auctions_scheduled_starts_at_idx on auctions (starts_at) where status = 'scheduled';
create index auctions_seller_id_idx on auctions (seller_id, id);

create table bids (
    id         bigint generated always as identity primary key,
    auction_id bigint not null constraint bids_auction_id_fkey references auctions (id),
    bidder_id  bigint not null constraint bids_bidder_id_fkey references accounts (id),
    amount     bigint not null,
    created_at timestamptz not null default now(),
    constraint bids_amount_positive check (amount > 0)
);

-- Bid history, newest first, keyset-paginated by id.
create index bids_auction_id_id_idx on bids (auction_id, id desc);
create index bids_bidder_id_idx on bids (bidder_id);

-- The outcome of a request sent with an Idempotency-Key, written in the same
-- transaction as the request's own write, so a replay returns exactly what the
-- first attempt answered.
create table idempotency_keys (
    account_id   bigint not null,
    scope        text not null,
    key          text not null,
    fingerprint  text not null,
    outcome      text not null,
    result       jsonb not null,
    created_at   timestamptz not null default now(),
    constraint idempotency_keys_pkey primary key (account_id, scope, key),
    constraint idempotency_keys_key_length check (char_length(key) between 1 and 255)
);

-- Claims an idempotency key for the rest of the transaction. A key is per account
-- and scope ('bid', 'order'). Returns a null outcome when the request is new (run
-- it, then remember_idempotency_key its outcome in the same transaction);
-- 'key_in_use' while another transaction holds the key; 'key_mismatch' when the
-- key was used with another request; else the stored outcome and result, to
-- replay. The advisory lock is taken without waiting, so a retry racing its first
-- attempt is told so at once.
create function claim_idempotency_key(
    p_account bigint, p_scope text, p_key text, p_fingerprint text,
    out claimed_outcome text, out claimed_result jsonb
)
language plpgsql as $$
declare
    k idempotency_keys;
begin
    if not pg_try_advisory_xact_lock(hashtextextended(p_account::text || '/' || p_scope || '/' || p_key, 0)) then
        claimed_outcome := 'key_in_use';
        return;
    end if;
    select * into k from idempotency_keys
     where account_id = p_account and scope = p_scope and key = p_key;
    if not found then
        return;
    elsif k.fingerprint <> p_fingerprint then
        claimed_outcome := 'key_mismatch';
    else
        claimed_outcome := k.outcome;
        claimed_result := k.result;
    end if;
end
$$;

-- Stores the outcome of a request made with a key, in the request's transaction.
create function remember_idempotency_key(
    p_account bigint, p_scope text, p_key text, p_fingerprint text, p_outcome text, p_result jsonb
) returns void
language sql as $$
    insert into idempotency_keys (account_id, scope, key, fingerprint, outcome, result)
    values (p_account, p_scope, p_key, p_fingerprint, p_outcome, p_result)
$$;

-- The state of an auction as the caches read it. Timestamps travel as epoch
-- microseconds, cheaper to parse than text and free of time zone settings.
create function auction_json(a auctions) returns text
language sql stable as $$
    select json_build_object(
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
    )::text
$$;

create function auctions_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('gavel_cache', auction_json(new));
    return null;
end
$$;

create trigger auctions_notify
    after insert or update on auctions
    for each row execute function auctions_notify();

-- Places a batch of bids, one conditional update each, and returns one outcome
-- per bid, tagged with its position in the batch. Bids are visited by auction id
-- and, within an auction, in arrival order: every batch then locks auction rows
-- in the same order, so two cores' batches can never deadlock, and the order
-- that matters (between bids on one auction) is the order they arrived in.
-- A bid from a token whose account does not exist gets its own outcome instead
-- of failing the whole batch on the foreign key. The conditional update is the only thing that
-- accepts a bid: the amount must reach the minimum and the auction must be open
-- by the database's clock. A bid in the last extend_secs seconds pushes ends_at
-- out by extend_secs. With a key, the outcome is stored beside the write; a
-- key still held by a running transaction answers key_in_use.
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
    auction      text
)
language plpgsql as $$
declare
    r auctions;
    c record;
    i integer;
begin
    for i in select s from generate_subscripts(p_auction, 1) as s order by p_auction[s], s loop
        ord := i;
        outcome := null;
        bid_id := null;
        amount := p_amount[i];
        min_next_bid := null;
        ends_at := null;
        auction := null;

        if not exists (select 1 from accounts a where a.id = p_bidder[i]) then
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

        update auctions a
           set high_bid = p_amount[i],
               high_bidder = p_bidder[i],
               bid_count = a.bid_count + 1,
               version = a.version + 1,
               ends_at = case
                   when a.extend_secs > 0 and a.ends_at - now() <= make_interval(secs => a.extend_secs)
                   then a.ends_at + make_interval(secs => a.extend_secs)
                   else a.ends_at
               end
         where a.id = p_auction[i]
           and a.status <> 'closed'
           and now() >= a.starts_at
           and now() < a.ends_at
           and p_amount[i] >= coalesce(a.high_bid + a.min_increment, a.reserve)
        returning a.* into r;

        if found then
            insert into bids (auction_id, bidder_id, amount)
            values (p_auction[i], p_bidder[i], p_amount[i])
            returning id into bid_id;
            outcome := 'accepted';
            min_next_bid := r.high_bid + r.min_increment;
            ends_at := r.ends_at;
            auction := auction_json(r);
        else
            select * into r from auctions a where a.id = p_auction[i];
            if not found then
                outcome := 'not_found';
            elsif r.status = 'closed' or now() < r.starts_at or now() >= r.ends_at then
                outcome := 'closed';
                ends_at := r.ends_at;
            else
                outcome := 'too_low';
                min_next_bid := coalesce(r.high_bid + r.min_increment, r.reserve);
                ends_at := r.ends_at;
            end if;
        end if;

        if p_key[i] is not null then
            perform remember_idempotency_key(p_bidder[i], 'bid', p_key[i], p_fingerprint[i], outcome,
                jsonb_build_object('bid_id', bid_id, 'amount', amount,
                                   'min_next_bid', min_next_bid, 'ends_at', ends_at));
        end if;
        return next;
    end loop;
end
$$;

-- Opens auctions whose start has come and closes those whose end has passed,
-- recording the winner: the high bidder, if the high bid meets the reserve.
-- Conditional on the clock, so it never races a bid that extends ends_at. Rows a
-- bid batch holds are skipped, not waited for (the next tick takes them), so the
-- tick never deadlocks with bids and never stalls them.
create function advance_auctions() returns integer
language plpgsql as $$
declare
    changed integer := 0;
    c integer;
begin
    update auctions a
       set status = 'closed',
           winner_id = case when a.high_bid >= a.reserve then a.high_bidder end,
           version = a.version + 1
     where a.id in (select id from auctions
                     where status <> 'closed' and ends_at <= now()
                     order by id
                     for update skip locked)
       and a.ends_at <= now();
    get diagnostics c = row_count;
    changed := changed + c;

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
