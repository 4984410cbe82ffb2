-- frugal label database, schema version 1.
-- Set on creation: PRAGMA application_id = 1179800903 (0x46525547, "FRUG");
--                  PRAGMA user_version = 1.

-- What the database is about. Keys: 'dataset' (e.g. 'fashion-mnist/train'), 'items' (number of
-- items), 'fingerprint' (hex CRC-32C of the items' pixel bytes), 'budget' (absent: no budget;
-- else the most labels that may ever be bought), 'created_at' (UTC, ISO 8601).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The simulated oracle's hidden answers: label of item `item` (0-based index into the split).
-- Only a purchase (LabelDb::query) reads it.
CREATE TABLE ground_truth (
    item  INTEGER PRIMARY KEY,
    label INTEGER NOT NULL
);

-- Every label bought, once per item, in purchase order. Append-only.
CREATE TABLE ledger (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    item      INTEGER NOT NULL UNIQUE REFERENCES ground_truth(item),
    label     INTEGER NOT NULL,
    round     INTEGER NOT NULL,
    strategy  TEXT NOT NULL,
    score     REAL,
    bought_at TEXT NOT NULL
);

-- The budget is enforced here, not only in frugal's code, so that no bug, crash or hand-written
-- INSERT can buy more labels than it allows.
CREATE TRIGGER ledger_budget BEFORE INSERT ON ledger
WHEN (SELECT COUNT(*) FROM ledger) >=
     (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'budget')
BEGIN
    SELECT RAISE(ABORT, 'label budget exhausted');
END;

-- Foreign keys are off unless a connection turns them on; this check holds for every client.
CREATE TRIGGER ledger_known_item BEFORE INSERT ON ledger
WHEN NOT EXISTS (SELECT 1 FROM ground_truth WHERE item = NEW.item)
BEGIN
    SELECT RAISE(ABORT, 'item is not in ground_truth');
END;

-- A ledger row records what the oracle answered; it cannot claim another label. (`<>` is NULL,
-- so silent, for an unknown item: the trigger above reports that, whichever order they run in.)
CREATE TRIGGER ledger_true_label BEFORE INSERT ON ledger
WHEN NEW.label <> (SELECT label FROM ground_truth WHERE item = NEW.item)
BEGIN
    SELECT RAISE(ABORT, 'ledger label differs from ground_truth');
END;

-- Deleting a purchase would let the same budget buy more labels; rewriting one would falsify the
-- record of what was learned when.
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'the label ledger is append-only');
END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'the label ledger is append-only');
END;

-- A budget may rise or fall, but never below what is already spent.
CREATE TRIGGER meta_budget_insert BEFORE INSERT ON meta
WHEN NEW.key = 'budget' AND CAST(NEW.value AS INTEGER) < (SELECT COUNT(*) FROM ledger)
BEGIN
    SELECT RAISE(ABORT, 'label budget below labels already bought');
END;
CREATE TRIGGER meta_budget_update BEFORE UPDATE ON meta
WHEN NEW.key = 'budget' AND CAST(NEW.value AS INTEGER) < (SELECT COUNT(*) FROM ledger)
BEGIN
    SELECT RAISE(ABORT, 'label budget below labels already bought');
END;
-- Dropping the budget row would lift the limit after the fact.
CREATE TRIGGER meta_budget_delete BEFORE DELETE ON meta
WHEN OLD.key = 'budget'
BEGIN
    SELECT RAISE(ABORT, 'the label budget can be changed but not removed');
END;
