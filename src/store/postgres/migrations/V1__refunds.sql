-- The shared state of refund-worker replicas (store.backend = "postgres").
-- One row per refund, decided by compare-and-swap on its revision; the
-- over-refund ledger, one row per original charge, locked for a
-- reservation; the outbox of events the broker has not confirmed; the
-- replicas' leases, renewed on the database's clock.

CREATE TABLE replicas (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL
);

CREATE TABLE refunds (
    refund_id     text        PRIMARY KEY,
    -- RefundState's name: attempting, not_sent, pending, finished, in_doubt.
    state         text        NOT NULL,
    -- What an operator sees: the event status of a finished refund.
    status        text        NOT NULL,
    provider      text        NOT NULL,
    -- Every write adds one and names the revision it read.
    revision      bigint      NOT NULL,
    -- The replica (its lease) whose attempt this is, while attempting.
    owner         bigint,
    record        jsonb       NOT NULL,
    pending_since timestamptz,
    -- The event's, for the reconciliation report.
    occurred_at   timestamptz,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

CREATE INDEX refunds_by_status ON refunds (status);
CREATE INDEX refunds_attempting ON refunds (owner) WHERE state = 'attempting';
CREATE INDEX refunds_pending ON refunds (pending_since) WHERE state = 'pending';
CREATE INDEX refunds_by_occurred_at ON refunds (occurred_at);
CREATE INDEX refunds_finished ON refunds (updated_at) WHERE state = 'finished';

CREATE TABLE tombstones (
    refund_id   text        PRIMARY KEY,
    tombstone   jsonb       NOT NULL,
    pruned_at   timestamptz NOT NULL,
    occurred_at timestamptz
);

CREATE INDEX tombstones_by_pruned_at ON tombstones (pruned_at);
CREATE INDEX tombstones_by_occurred_at ON tombstones (occurred_at);

CREATE TABLE ledgers (
    key        text        PRIMARY KEY,
    ledger     jsonb       NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE outbox (
    refund_id     text        PRIMARY KEY,
    event_id      text        NOT NULL,
    since         timestamptz NOT NULL DEFAULT now(),
    -- A replica's sweep took it until then.
    claimed_until timestamptz
);
