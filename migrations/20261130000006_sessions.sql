-- Sessions that end before their tokens expire.
--
-- A log-out revokes one token, by the session id it carries (`jti`). A
-- password change ends every session of the account at once: it raises the
-- account's session epoch, which each token carries as it was when the token
-- was issued (`sep`), and a token of an older epoch no longer counts.
--
-- Both are announced on the cache channel, so every core of every instance
-- refuses the token from its own memory, with no database round trip per
-- request: `revoked` names the session and when its token would have expired
-- anyway (after that, nobody needs to remember it); `sessions_ended` names the
-- account and its new epoch.

alter table accounts
    add column session_epoch integer not null default 0,
    -- When the epoch last rose; a core remembers the epoch only while tokens
    -- issued before it could still be unexpired.
    add column sessions_ended_at timestamptz;

create table revoked_sessions (
    session_id uuid primary key,
    account_id bigint not null references accounts (id),
    -- The token's own expiry: past it the row is of no use, and is purged.
    expires_at timestamptz not null,
    revoked_at timestamptz not null default now()
);

create index revoked_sessions_expires_at_idx on revoked_sessions (expires_at);

create function revoked_sessions_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('gavel_cache', json_build_object(
        'kind', 'revoked',
        'at_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint,
        'session_id', new.session_id,
        'account_id', new.account_id,
        'expires_us', (extract(epoch from new.expires_at) * 1000000)::bigint
    )::text);
    return null;
end
$$;

create trigger revoked_sessions_notify
    after insert on revoked_sessions
    for each row execute function revoked_sessions_notify();

create function sessions_ended_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('gavel_cache', json_build_object(
        'kind', 'sessions_ended',
        'at_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint,
        'account_id', new.id,
        'epoch', new.session_epoch,
        'ended_us', (extract(epoch from new.sessions_ended_at) * 1000000)::bigint
    )::text);
    return null;
end
$$;

create trigger sessions_ended_notify
    after update of session_epoch on accounts
    for each row when (old.session_epoch is distinct from new.session_epoch)
    execute function sessions_ended_notify();
