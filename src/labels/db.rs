//! [`LabelDb`]: opening, creating and querying the SQLite file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use super::{
    BoughtLabel, DatasetId, LabelDbError, LabelStatus, Purchase, RoundStatus, APPLICATION_ID,
    SCHEMA_VERSION,
};
use crate::data::CLASS_NAMES;

/// The tables and triggers of a new database (also shown in the module documentation).
const SCHEMA: &str = include_str!("schema.sql");

/// The message of the trigger that refuses a ledger row past the budget.
const BUDGET_EXHAUSTED: &str = "label budget exhausted";

/// An open label database. All reads and writes of labels go through it; every change is one
/// transaction, committed durably (`synchronous = FULL`) before the call returns.
#[derive(Debug)]
pub struct LabelDb {
    conn: Connection,
    path: PathBuf,
}

/// Wraps an SQLite error with the file it concerns.
fn sql(path: &Path) -> impl FnOnce(rusqlite::Error) -> LabelDbError + '_ {
    move |e| LabelDbError::Sqlite(path.into(), e)
}

fn corrupt(path: &Path, what: impl Into<String>) -> LabelDbError {
    LabelDbError::Corrupt {
        path: path.into(),
        what: what.into(),
    }
}

/// Labels bought so far.
fn count_ledger(conn: &Connection) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT COUNT(*) FROM ledger")?
        .query_row([], |r| r.get(0))
}

fn meta_value(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

/// A meta entry that every database has.
fn required_meta(conn: &Connection, path: &Path, key: &str) -> Result<String, LabelDbError> {
    meta_value(conn, key)
        .map_err(sql(path))?
        .ok_or_else(|| corrupt(path, format!("no '{key}' in table meta")))
}

fn read_dataset(conn: &Connection, path: &Path) -> Result<DatasetId, LabelDbError> {
    let items = required_meta(conn, path, "items")?;
    Ok(DatasetId {
        name: required_meta(conn, path, "dataset")?,
        items: items
            .parse()
            .map_err(|_| corrupt(path, format!("meta 'items' is {items:?}, not a count")))?,
        fingerprint: required_meta(conn, path, "fingerprint")?,
    })
}

fn read_budget(conn: &Connection, path: &Path) -> Result<Option<u64>, LabelDbError> {
    meta_value(conn, "budget")
        .map_err(sql(path))?
        .map(|b| {
            b.parse()
                .map_err(|_| corrupt(path, format!("meta 'budget' is {b:?}, not a count")))
        })
        .transpose()
}

/// True if `e` is the budget trigger refusing a ledger row.
fn is_budget_trigger(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, Some(msg))
        if f.code == ErrorCode::ConstraintViolation && msg.contains(BUDGET_EXHAUSTED))
}

/// Writes a complete new database at `tmp`: schema, meta, ground truth, in one transaction.
fn fill(
    tmp: &Path,
    dataset: &DatasetId,
    labels: &[u8],
    budget: Option<u64>,
) -> rusqlite::Result<()> {
    let mut conn = Connection::open_with_flags(
        tmp,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    {
        let mut meta = tx.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
        meta.execute(["dataset", &dataset.name])?;
        meta.execute(["items", &dataset.items.to_string()])?;
        meta.execute(["fingerprint", &dataset.fingerprint])?;
        if let Some(budget) = budget {
            meta.execute(["budget", &budget.to_string()])?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) \
             VALUES ('created_at', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            [],
        )?;
        let mut truth = tx.prepare("INSERT INTO ground_truth (item, label) VALUES (?1, ?2)")?;
        for (item, &label) in labels.iter().enumerate() {
            truth.execute(params![item as u64, label])?;
        }
    }
    tx.commit()?;
    conn.close().map_err(|(_, e)| e)
}

/// Removes `path` if it exists.
fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Where a database bound for `path` is written before [`publish`] gives it that name: a hidden
/// name in the same directory, unique to this process.
fn partial_path(path: &Path) -> Result<PathBuf, LabelDbError> {
    let Some(name) = path.file_name() else {
        return Err(LabelDbError::BadInput {
            path: path.into(),
            what: "the path names no file".into(),
        });
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".partial-{}", std::process::id()));
    Ok(path.parent().unwrap_or(Path::new("")).join(tmp_name))
}

/// Gives the finished file `tmp` the name `path`, never replacing an existing `path`.
fn publish(tmp: &Path, path: &Path) -> Result<(), LabelDbError> {
    let io = |error| LabelDbError::Io {
        path: path.into(),
        error,
    };
    // A hard link fails if `path` exists, atomically, where a rename would silently replace it
    // (and with it a ledger of bought labels).
    match std::fs::hard_link(tmp, path) {
        Ok(()) => remove_if_present(tmp).map_err(io)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(LabelDbError::AlreadyExists(path.into()))
        }
        // Some file systems have no hard links: rename after checking, the best they allow.
        Err(_) => {
            if path.symlink_metadata().is_ok() {
                return Err(LabelDbError::AlreadyExists(path.into()));
            }
            std::fs::rename(tmp, path).map_err(io)?;
        }
    }
    // The new name must survive a crash too, not only the file's contents.
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

impl LabelDb {
    /// Creates a new database file at `path` (refusing if anything is there) holding
    /// `labels[i]` as the ground truth of item `i`, and `budget` if given.
    ///
    /// The file is written under a temporary name in the same directory and renamed when
    /// complete, so a crash never leaves a half-filled database at `path`.
    pub fn create(
        path: &Path,
        dataset: &DatasetId,
        labels: &[u8],
        budget: Option<u64>,
    ) -> Result<Self, LabelDbError> {
        let bad = |what: String| LabelDbError::BadInput {
            path: path.into(),
            what,
        };
        if path.symlink_metadata().is_ok() {
            return Err(LabelDbError::AlreadyExists(path.into()));
        }
        if labels.len() as u64 != dataset.items {
            return Err(bad(format!("{} labels for {}", labels.len(), dataset)));
        }
        if let Some((item, label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= CLASS_NAMES.len())
        {
            return Err(bad(format!(
                "label {label} of item {item} is not a class (0..{})",
                CLASS_NAMES.len()
            )));
        }
        let tmp = partial_path(path)?;
        let mut journal = tmp.clone().into_os_string();
        journal.push("-journal");
        let journal = PathBuf::from(journal);

        // A leftover of a crashed import with our process id cannot belong to anyone else.
        for p in [&tmp, &journal] {
            remove_if_present(p).map_err(|error| LabelDbError::Io {
                path: p.clone(),
                error,
            })?;
        }
        let written = fill(&tmp, dataset, labels, budget)
            .map_err(|e| LabelDbError::Sqlite(tmp.clone(), e))
            .and_then(|()| publish(&tmp, path));
        if let Err(e) = written {
            // Best effort: the error at hand matters more than a failed cleanup.
            let _ = remove_if_present(&tmp);
            let _ = remove_if_present(&journal);
            return Err(e);
        }
        Self::open(path)
    }

    /// Opens an existing database, checking that it is a frugal label database of the schema
    /// version this frugal reads.
    pub fn open(path: &Path) -> Result<Self, LabelDbError> {
        match path.metadata() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LabelDbError::NotFound(path.into()))
            }
            Err(error) => {
                return Err(LabelDbError::Io {
                    path: path.into(),
                    error,
                })
            }
            Ok(_) => {}
        }
        // No CREATE flag: a file removed since the check above is an error, not a new database.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(path))?;
        // SQLite reads the header lazily: the first query is what finds out what the file is.
        let app_id: i32 = match conn.pragma_query_value(None, "application_id", |r| r.get(0)) {
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) => {
                return Err(LabelDbError::NotSqlite(path.into()))
            }
            r => r.map_err(sql(path))?,
        };
        if app_id != APPLICATION_ID {
            return Err(LabelDbError::NotLabelDb(path.into()));
        }
        let version: i32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql(path))?;
        if version != SCHEMA_VERSION {
            return Err(LabelDbError::Version {
                path: path.into(),
                found: version,
            });
        }
        // Per connection, not stored in the file: a purchase is on disk when `query` returns.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql(path))?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(sql(path))?;
        Ok(Self {
            conn,
            path: path.into(),
        })
    }

    /// The file this database is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The items this database holds labels for.
    pub fn dataset(&self) -> Result<DatasetId, LabelDbError> {
        read_dataset(&self.conn, &self.path)
    }

    /// `Err(OtherDataset)` unless the database holds labels of exactly `expected` (same name,
    /// item count and fingerprint).
    pub fn check_dataset(&self, expected: &DatasetId) -> Result<(), LabelDbError> {
        let found = self.dataset()?;
        if &found != expected {
            return Err(LabelDbError::OtherDataset {
                path: self.path.clone(),
                found: Box::new(found),
                expected: Box::new(expected.clone()),
            });
        }
        Ok(())
    }

    /// The most labels that may ever be bought, `None` without a budget.
    pub fn budget(&self) -> Result<Option<u64>, LabelDbError> {
        read_budget(&self.conn, &self.path)
    }

    /// Sets, raises or lowers the budget; refuses a budget below the labels already bought.
    pub fn set_budget(&mut self, budget: u64) -> Result<(), LabelDbError> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path))?;
        let spent = count_ledger(&tx).map_err(sql(path))?;
        if budget < spent {
            return Err(LabelDbError::BudgetBelowSpent {
                path: path.clone(),
                budget,
                spent,
            });
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('budget', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [budget.to_string()],
        )
        .map_err(sql(path))?;
        tx.commit().map_err(sql(path))
    }

    /// Writes a consistent copy of this database (ground truth, budget and ledger) to `to`, where
    /// nothing may be yet; the copy is complete before it appears under that name.
    pub fn copy_to(&self, to: &Path) -> Result<(), LabelDbError> {
        if to.symlink_metadata().is_ok() {
            return Err(LabelDbError::AlreadyExists(to.into()));
        }
        let tmp = partial_path(to)?;
        // A leftover of a crashed copy with our process id cannot belong to anyone else.
        remove_if_present(&tmp).map_err(|error| LabelDbError::Io {
            path: tmp.clone(),
            error,
        })?;
        let target = tmp.to_str().ok_or_else(|| LabelDbError::BadInput {
            path: to.into(),
            what: "the path is not valid UTF-8".into(),
        })?;
        // VACUUM INTO writes a transactionally consistent snapshot, whatever else has the file open.
        let copied = self
            .conn
            .execute("VACUUM INTO ?1", [target])
            .map_err(sql(&tmp))
            .and_then(|_| {
                // VACUUM INTO does not sync its output: the copy must be on disk before its name.
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|error| LabelDbError::Io {
                        path: tmp.clone(),
                        error,
                    })
            })
            .and_then(|()| publish(&tmp, to));
        if let Err(e) = copied {
            let _ = remove_if_present(&tmp);
            return Err(e);
        }
        Ok(())
    }

    /// Labels bought so far.
    pub fn spent(&self) -> Result<u64, LabelDbError> {
        count_ledger(&self.conn).map_err(sql(&self.path))
    }

    /// Buys labels: THE way for a learner to learn any training label.
    ///
    /// Returns the label of every requested item, in order. Items already in the ledger cost
    /// nothing (their ledger row is kept as it is); new ones are recorded with their round,
    /// strategy, score and time, and charged once each, even if asked for twice in one call.
    /// All in one `BEGIN IMMEDIATE` transaction: if the new items would exceed the budget
    /// (`BudgetExceeded`) or any item is unknown (`UnknownItem`), nothing is recorded.
    pub fn query(&mut self, purchases: &[Purchase]) -> Result<Vec<u8>, LabelDbError> {
        let path = &self.path;
        // IMMEDIATE takes the write lock up front, so the budget read below is still true when
        // the rows are inserted, whatever other processes do.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path))?;
        let mut labels = Vec::with_capacity(purchases.len());
        let mut new = Vec::new();
        {
            let mut truth = tx
                .prepare_cached("SELECT label FROM ground_truth WHERE item = ?1")
                .map_err(sql(path))?;
            let mut owned = tx
                .prepare_cached("SELECT 1 FROM ledger WHERE item = ?1")
                .map_err(sql(path))?;
            let mut seen = HashSet::with_capacity(purchases.len());
            for p in purchases {
                // Items past i64::MAX cannot be in SQLite; they are just as unknown.
                let label: Option<u8> = match i64::try_from(p.item) {
                    Ok(item) => truth
                        .query_row([item], |r| r.get(0))
                        .optional()
                        .map_err(sql(path))?,
                    Err(_) => None,
                };
                let Some(label) = label else {
                    // Dropping `tx` rolls back (nothing was written yet anyway).
                    return Err(LabelDbError::UnknownItem {
                        path: path.clone(),
                        item: p.item,
                        items: read_dataset(&tx, path)?.items,
                    });
                };
                labels.push(label);
                if seen.insert(p.item) && !owned.exists([p.item]).map_err(sql(path))? {
                    new.push((p, label));
                }
            }
        }
        if new.is_empty() {
            return Ok(labels);
        }
        let spent = count_ledger(&tx).map_err(sql(path))?;
        let budget = read_budget(&tx, path)?;
        let exceeded = |budget| LabelDbError::BudgetExceeded {
            path: path.clone(),
            budget,
            spent,
            asked: new.len() as u64,
        };
        if let Some(budget) = budget {
            if spent + new.len() as u64 > budget {
                return Err(exceeded(budget));
            }
        }
        // One timestamp for the whole purchase: it is one decision.
        let now: String = tx
            .query_row("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')", [], |r| {
                r.get(0)
            })
            .map_err(sql(path))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO ledger (item, label, round, strategy, score, bought_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(sql(path))?;
            for (p, label) in &new {
                insert
                    .execute(params![p.item, label, p.round, p.strategy, p.score, now])
                    .map_err(|e| {
                        // The check above makes this unreachable; if the trigger disagrees, it
                        // wins, and the transaction is rolled back when `tx` drops.
                        if is_budget_trigger(&e) {
                            exceeded(budget.unwrap_or(spent))
                        } else {
                            LabelDbError::Sqlite(path.clone(), e)
                        }
                    })?;
            }
        }
        tx.commit().map_err(sql(path))?;
        Ok(labels)
    }

    /// Every ledger row, in purchase order.
    pub fn bought(&self) -> Result<Vec<BoughtLabel>, LabelDbError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, item, label, round, strategy, score, bought_at \
                 FROM ledger ORDER BY seq",
            )
            .map_err(sql(path))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(BoughtLabel {
                    seq: r.get(0)?,
                    item: r.get(1)?,
                    label: r.get(2)?,
                    round: r.get(3)?,
                    strategy: r.get(4)?,
                    score: r.get(5)?,
                    bought_at: r.get(6)?,
                })
            })
            .map_err(sql(path))?;
        rows.collect::<Result<_, _>>().map_err(sql(path))
    }

    /// Budget, spending, and what the labels bought were (per class, per round).
    pub fn status(&self) -> Result<LabelStatus, LabelDbError> {
        let path = &self.path;
        // One read transaction: all numbers from the same state, even while a run buys labels.
        let tx = self.conn.unchecked_transaction().map_err(sql(path))?;
        let mut per_class = vec![0u64; CLASS_NAMES.len()];
        {
            let mut stmt = tx
                .prepare_cached("SELECT label, COUNT(*) FROM ledger GROUP BY label")
                .map_err(sql(path))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, u64>(1)?)))
                .map_err(sql(path))?;
            for row in rows {
                let (label, count) = row.map_err(sql(path))?;
                let slot = usize::try_from(label)
                    .ok()
                    .and_then(|l| per_class.get_mut(l))
                    .ok_or_else(|| corrupt(path, format!("ledger holds label {label}")))?;
                *slot = count;
            }
        }
        let per_round = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT round, strategy, COUNT(*) FROM ledger \
                     GROUP BY round, strategy ORDER BY round, MIN(seq)",
                )
                .map_err(sql(path))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(RoundStatus {
                        round: r.get(0)?,
                        strategy: r.get(1)?,
                        bought: r.get(2)?,
                    })
                })
                .map_err(sql(path))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sql(path))?
        };
        let status = LabelStatus {
            dataset: read_dataset(&tx, path)?,
            budget: read_budget(&tx, path)?,
            spent: count_ledger(&tx).map_err(sql(path))?,
            per_class,
            per_round,
        };
        tx.finish().map_err(sql(path))?;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20 items, label of item i = i % 10.
    fn labels() -> Vec<u8> {
        (0..20u8).map(|i| i % 10).collect()
    }

    fn dataset() -> DatasetId {
        DatasetId {
            name: "test/train".into(),
            items: 20,
            fingerprint: "0123abcd".into(),
        }
    }

    fn new_db(dir: &Path, budget: Option<u64>) -> LabelDb {
        LabelDb::create(&dir.join("labels.db"), &dataset(), &labels(), budget).unwrap()
    }

    fn buy(item: u64, round: u32, strategy: &str) -> Purchase<'_> {
        Purchase {
            item,
            round,
            strategy,
            score: None,
        }
    }

    #[test]
    fn query_returns_true_labels_and_records_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = new_db(dir.path(), None);
        assert_eq!(db.spent().unwrap(), 0);
        let got = db
            .query(&[
                Purchase {
                    item: 3,
                    round: 0,
                    strategy: "random",
                    score: None,
                },
                Purchase {
                    item: 17,
                    round: 0,
                    strategy: "random",
                    score: Some(0.25),
                },
            ])
            .unwrap();
        assert_eq!(got, vec![3, 7]);
        assert_eq!(db.spent().unwrap(), 2);
        let rows = db.bought().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].seq, rows[0].item, rows[0].label), (1, 3, 3));
        assert_eq!((rows[1].seq, rows[1].item, rows[1].label), (2, 17, 7));
        assert_eq!(rows[0].round, 0);
        assert_eq!(rows[0].strategy, "random");
        assert_eq!(rows[0].score, None);
        assert_eq!(rows[1].score, Some(0.25));
        assert!(rows[0].bought_at.ends_with('Z'), "{}", rows[0].bought_at);
        assert_eq!(db.dataset().unwrap(), dataset());
        db.check_dataset(&dataset()).unwrap();
    }

    #[test]
    fn requery_is_free_and_keeps_the_first_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = new_db(dir.path(), Some(3));
        assert_eq!(db.query(&[buy(5, 0, "random")]).unwrap(), vec![5]);
        // Item 5 again (free), with item 12 new: one label charged.
        let got = db
            .query(&[buy(12, 1, "entropy"), buy(5, 1, "entropy")])
            .unwrap();
        assert_eq!(got, vec![2, 5]);
        assert_eq!(db.spent().unwrap(), 2);
        let rows = db.bought().unwrap();
        assert_eq!(rows[0].item, 5);
        assert_eq!((rows[0].round, rows[0].strategy.as_str()), (0, "random"));
        assert_eq!((rows[1].item, rows[1].round), (12, 1));
        // With the budget nearly used, bought items can still be read back.
        assert_eq!(
            db.query(&[buy(5, 2, "x"), buy(12, 2, "x")]).unwrap(),
            vec![5, 2]
        );
        assert_eq!(db.spent().unwrap(), 2);
    }

    #[test]
    fn duplicates_in_one_call_are_charged_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = new_db(dir.path(), Some(1));
        let got = db
            .query(&[buy(9, 0, "a"), buy(9, 0, "a"), buy(9, 0, "a")])
            .unwrap();
        assert_eq!(got, vec![9, 9, 9]);
        assert_eq!(db.spent().unwrap(), 1);
        assert_eq!(db.bought().unwrap().len(), 1);
    }

    #[test]
    fn over_budget_purchase_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = new_db(dir.path(), Some(3));
        db.query(&[buy(0, 0, "random")]).unwrap();
        let err = db
            .query(&[buy(1, 1, "e"), buy(2, 1, "e"), buy(3, 1, "e")])
            .unwrap_err();
        assert!(
            matches!(
                err,
                LabelDbError::BudgetExceeded {
                    budget: 3,
                    spent: 1,
                    asked: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("labels.db"), "{err}");
        assert_eq!(db.spent().unwrap(), 1);
        assert_eq!(db.bought().unwrap().len(), 1);
        // Exactly reaching the budget is allowed; one more is not.
        assert_eq!(
            db.query(&[buy(1, 1, "e"), buy(2, 1, "e")]).unwrap(),
            vec![1, 2]
        );
        assert_eq!(db.spent().unwrap(), 3);
        assert!(matches!(
            db.query(&[buy(4, 2, "e")]),
            Err(LabelDbError::BudgetExceeded { .. })
        ));
        assert_eq!(db.spent().unwrap(), 3);
    }

    #[test]
    fn zero_budget_buys_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = new_db(dir.path(), Some(0));
        assert!(db.query(&[buy(0, 0, "random")]).is_err());
        // Asking for nothing is not a purchase.
        assert_eq!(db.query(&[]).unwrap(), Vec::<u8>::new());
        assert_eq!(db.spent().unwrap(), 0);
    }

    #[test]
    fn raw_sql_cannot_overspend_or_rewrite_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.db");
        let mut db = new_db(dir.path(), Some(2));
        db.query(&[buy(0, 0, "r"), buy(1, 0, "r")]).unwrap();
        drop(db);

        // Another client, with nothing of frugal's code: the triggers alone must hold.
        let conn = Connection::open(&path).unwrap();
        let insert = |item: i64, label: i64| {
            conn.execute(
                "INSERT INTO ledger (item, label, round, strategy, bought_at) \
                 VALUES (?1, ?2, 0, 'sql', 'now')",
                [item, label],
            )
        };
        let err = insert(2, 2).unwrap_err();
        assert!(err.to_string().contains(BUDGET_EXHAUSTED), "{err}");
        assert!(is_budget_trigger(&err));
        conn.execute("UPDATE meta SET value = '10' WHERE key = 'budget'", [])
            .unwrap();
        let err = insert(99, 0).unwrap_err();
        assert!(err.to_string().contains("not in ground_truth"), "{err}");
        let err = insert(2, 5).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
        insert(2, 2).unwrap();
        let err = conn.execute("DELETE FROM ledger", []).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
        let err = conn
            .execute("UPDATE ledger SET label = 0 WHERE item = 2", [])
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
        let err = conn
            .execute("UPDATE meta SET value = '1' WHERE key = 'budget'", [])
            .unwrap_err();
        assert!(err.to_string().contains("below"), "{err}");
        let err = conn
            .execute("DELETE FROM meta WHERE key = 'budget'", [])
            .unwrap_err();
        assert!(err.to_string().contains("not removed"), "{err}");
        drop(conn);
        assert_eq!(LabelDb::open(&path).unwrap().spent().unwrap(), 3);
    }

    #[test]
    fn unknown_item_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = new_db(dir.path(), None);
        for item in [20, u64::MAX] {
            let err = db.query(&[buy(1, 0, "r"), buy(item, 0, "r")]).unwrap_err();
            assert!(
                matches!(err, LabelDbError::UnknownItem { item: i, items: 20, .. } if i == item),
                "{err}"
            );
        }
        assert_eq!(db.spent().unwrap(), 0);
    }

    #[test]
    fn set_budget_raises_and_lowers_but_not_below_spent() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = new_db(dir.path(), None);
        assert_eq!(db.budget().unwrap(), None);
        db.query(&[buy(0, 0, "r"), buy(1, 0, "r"), buy(2, 0, "r")])
            .unwrap();
        db.set_budget(10).unwrap();
        assert_eq!(db.budget().unwrap(), Some(10));
        db.set_budget(3).unwrap();
        assert_eq!(db.budget().unwrap(), Some(3));
        let err = db.set_budget(2).unwrap_err();
        assert!(
            matches!(
                err,
                LabelDbError::BudgetBelowSpent {
                    budget: 2,
                    spent: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("labels.db"), "{err}");
        assert_eq!(db.budget().unwrap(), Some(3));
        db.set_budget(5).unwrap();
        db.query(&[buy(3, 1, "r"), buy(4, 1, "r")]).unwrap();
        assert_eq!(db.spent().unwrap(), 5);
    }

    #[test]
    fn open_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.db");
        let err = LabelDb::open(&path).unwrap_err();
        assert!(matches!(err, LabelDbError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("nope.db"), "{err}");
        // Opening must not have created it.
        assert!(!path.exists());
    }

    #[test]
    fn open_file_that_is_not_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("random.bin");
        // Deterministic noise (an LCG), longer than SQLite's 100-byte header.
        let mut x = 0x1234_5678u32;
        let bytes: Vec<u8> = (0..5000)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let err = LabelDb::open(&path).unwrap_err();
        assert!(matches!(err, LabelDbError::NotSqlite(_)), "{err}");
        assert!(err.to_string().contains("random.bin"), "{err}");
        assert!(err.to_string().contains("not a database"), "{err}");
        // Left untouched.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn open_sqlite_file_of_another_application() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(conn);
        let err = LabelDb::open(&path).unwrap_err();
        assert!(matches!(err, LabelDbError::NotLabelDb(_)), "{err}");
        assert!(err.to_string().contains("other.sqlite"), "{err}");
        assert!(
            err.to_string().contains("not a frugal label database"),
            "{err}"
        );
        // An empty file is an empty SQLite database, and not ours either.
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let err = LabelDb::open(&empty).unwrap_err();
        assert!(matches!(err, LabelDbError::NotLabelDb(_)), "{err}");
    }

    #[test]
    fn open_other_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.db");
        drop(new_db(dir.path(), None));
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        drop(conn);
        let err = LabelDb::open(&path).unwrap_err();
        assert!(
            matches!(err, LabelDbError::Version { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("labels.db"), "{err}");
    }

    #[test]
    fn check_dataset_refuses_other_images() {
        let dir = tempfile::tempdir().unwrap();
        let db = new_db(dir.path(), None);
        for other in [
            DatasetId {
                fingerprint: "ffffffff".into(),
                ..dataset()
            },
            DatasetId {
                items: 21,
                ..dataset()
            },
            DatasetId {
                name: "fashion-mnist/train".into(),
                ..dataset()
            },
        ] {
            let err = db.check_dataset(&other).unwrap_err();
            assert!(matches!(err, LabelDbError::OtherDataset { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("labels.db"), "{msg}");
            assert!(msg.contains(&other.to_string()), "{msg}");
        }
    }

    #[test]
    fn create_refuses_existing_path_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.db");
        std::fs::write(&path, b"precious").unwrap();
        let err = LabelDb::create(&path, &dataset(), &labels(), None).unwrap_err();
        assert!(matches!(err, LabelDbError::AlreadyExists(_)), "{err}");
        assert!(err.to_string().contains("labels.db"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");

        let other = dir.path().join("other.db");
        let err = LabelDb::create(&other, &dataset(), &labels()[..19], None).unwrap_err();
        assert!(matches!(err, LabelDbError::BadInput { .. }), "{err}");
        let mut bad = labels();
        bad[4] = 10;
        let err = LabelDb::create(&other, &dataset(), &bad, None).unwrap_err();
        assert!(matches!(err, LabelDbError::BadInput { .. }), "{err}");
        assert!(!other.exists());
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("labels.db")]);
    }

    #[test]
    fn ledger_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.db");
        let mut db = new_db(dir.path(), Some(5));
        db.query(&[buy(7, 0, "random"), buy(8, 1, "margin")])
            .unwrap();
        let before = db.bought().unwrap();
        drop(db);
        let db = LabelDb::open(&path).unwrap();
        assert_eq!(db.path(), path);
        assert_eq!(db.bought().unwrap(), before);
        assert_eq!(db.budget().unwrap(), Some(5));
        assert_eq!(db.spent().unwrap(), 2);
        assert_eq!(db.dataset().unwrap(), dataset());
        // Only the database itself in the directory: no journal or temporary file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn status_counts_per_class_and_round() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = new_db(dir.path(), Some(10));
        // Items 0, 10 are class 0; 1, 11 class 1; 5 class 5.
        db.query(&[
            buy(0, 0, "random"),
            buy(1, 0, "random"),
            buy(5, 0, "random"),
        ])
        .unwrap();
        db.query(&[buy(10, 1, "entropy"), buy(0, 1, "entropy")])
            .unwrap();
        db.query(&[buy(11, 2, "entropy")]).unwrap();
        let status = db.status().unwrap();
        assert_eq!(status.spent, 5);
        assert_eq!(status.budget, Some(10));
        assert_eq!(status.remaining(), Some(5));
        assert_eq!(status.dataset, dataset());
        assert_eq!(status.per_class, vec![2, 2, 0, 0, 0, 1, 0, 0, 0, 0]);
        let rounds: Vec<_> = status
            .per_round
            .iter()
            .map(|r| (r.round, r.strategy.as_str(), r.bought))
            .collect();
        assert_eq!(
            rounds,
            vec![(0, "random", 3), (1, "entropy", 1), (2, "entropy", 1)]
        );
        let text = status.to_string();
        for needle in [
            "test/train",
            "budget     10",
            "remaining  5",
            "Trouser",
            "entropy",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }

        let empty = LabelDb::create(&dir.path().join("e.db"), &dataset(), &labels(), None)
            .unwrap()
            .status()
            .unwrap();
        assert_eq!(empty.per_class, vec![0; 10]);
        assert!(empty.per_round.is_empty());
        assert!(empty.to_string().contains("no labels bought yet"));
    }
}
