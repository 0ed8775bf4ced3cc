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
    -- The record in its compact binary form (src/store/codec.rs), as the
    -- sled store keeps it: a third of its JSON, and no JSON parsing on
    -- every write. Operators read it through the worker's API.
    record        bytea       NOT NULL,
    pending_since timestamptz,
    -- The event's, for the reconciliation report.
    occurred_at   timestamptz,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- Few indexes: every one is written on the hot path. Listing finished
-- refunds by status walks the table (an operator's rare request); the
-- undecided ones, which operators list often, have their own.
CREATE INDEX refunds_undecided ON refunds (status) WHERE state <> 'finished';
CREATE INDEX refunds_attempting ON refunds (owner) WHERE state = 'attempting';
-- The report, and pruning (a finished refund's event time is its last
-- change but for operators' notes).
CREATE INDEX refunds_by_occurred_at ON refunds (occurred_at);

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
