//! Settlement: the verified ledger goes on-chain, one Merkle root per epoch.
//!
//! An epoch *settles* every credit not settled before that belongs to a worker with a payout
//! address: each such credit row is copied into `settled` with the address and the epoch, once
//! and for ever (a later change of payout address moves only later credit, so no address's
//! cumulative amount ever shrinks and nothing can be claimed twice). The epoch's tree has one
//! leaf per address: its cumulative settled credit in micro-credits (the token's unit).
//!
//! Posting is two steps, each crash-safe: *build* (one transaction: the `settled` rows and the
//! `epochs` row with its root) and *post* (the root goes to the contract; the row is marked
//! posted). A restart finds a built but unposted epoch and posts that same root; if the chain
//! already has it (a crash after sending), it is only marked. So every epoch has exactly one
//! root, on-chain and here.

use std::sync::{Arc, Mutex};

use sqlx::Row;
use tabula_chain::{
    Address, B256, Chain, TxOutcome, U256,
    merkle::{CreditTree, Entry},
};

use crate::{Config, CoordinatorError, db::Db, db::now_ms};

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// What `post_epoch` did.
#[derive(Debug, Clone)]
pub enum Posted {
    /// Nothing was credited to a payout address since the last epoch.
    NothingNew { latest: u64 },
    /// Epoch `epoch` is on-chain: posted now (with its transaction) or found there already.
    Epoch {
        epoch: u64,
        root: B256,
        contributors: u64,
        total_micro: u64,
        tx: Option<TxOutcome>,
    },
}

/// One address's position in the latest posted epoch.
#[derive(Debug, Clone)]
pub struct Proof {
    pub epoch: u64,
    pub root: B256,
    pub account: Address,
    pub cumulative_micro: U256,
    pub proof: Vec<B256>,
}

/// What `verify` compared.
#[derive(Debug, Clone)]
pub struct Verification {
    pub epoch: u64,
    /// The root rebuilt from the ledger's credit rows.
    pub rebuilt: B256,
    /// The root stored when the epoch was built.
    pub stored: B256,
    /// The root the contract holds for the epoch.
    pub on_chain: B256,
    pub contributors: u64,
}

impl Verification {
    pub fn matches(&self) -> bool {
        self.rebuilt == self.stored && self.stored == self.on_chain
    }
}

/// A built tree, kept for the latest posted epoch so proofs cost a lookup.
struct EpochTree {
    epoch: u64,
    entries: Vec<Entry>,
    tree: CreditTree,
}

/// The chain and the settled ledger: builds, posts and proves epochs.
pub struct Settlement {
    pub chain: Chain,
    /// Serialises posting inside this process (the database serialises processes).
    posting: tokio::sync::Mutex<()>,
    latest_tree: Mutex<Option<Arc<EpochTree>>>,
    /// Addresses whose relayed claim is being sent and mined: a second claim for one of them
    /// would revert (and on a real chain, pay for it), so it is refused until the receipt.
    /// At most [`MAX_CLAIMS_IN_FLIGHT`] at once.
    claiming: Mutex<std::collections::HashSet<Address>>,
    /// Credit younger than this is not settled yet: an audit may still find it was earned
    /// by lying. A banned worker's credit is never settled.
    audit_window_ms: u64,
}

fn parse_address(s: &str) -> Result<Address> {
    s.parse()
        .map_err(|e| CoordinatorError::Corrupt(format!("stored address {s}: {e}")))
}

fn parse_root(s: &str) -> Result<B256> {
    s.parse()
        .map_err(|e| CoordinatorError::Corrupt(format!("stored root {s}: {e}")))
}

/// A fault-injection point for the crash-safety test: with `TABULA_FAULT=<name>` the process
/// dies here as `kill -9` would kill it (no destructors, no flush).
fn fault_point(name: &str) {
    if std::env::var("TABULA_FAULT").is_ok_and(|v| v == name) {
        tracing::warn!("TABULA_FAULT={name}: aborting the process here");
        std::process::abort();
    }
}

impl Settlement {
    /// The chain `config` names: `--chain-rpc` with its key, else the embedded EVM in the data
    /// directory (its owner is the coordinator's chain key, created on first start).
    pub async fn open(config: &Config) -> Result<Self> {
        let key = chain_key(config)?;
        let chain = match &config.chain_rpc {
            Some(url) => {
                Chain::rpc(
                    url,
                    &key,
                    config.chain_contract,
                    &config.data_dir.join("chain-deployment.json"),
                )
                .await?
            }
            None => {
                let owner = tabula_chain::address_of_key(&key)?;
                Chain::embedded(&config.data_dir.join("chain").join("state.json"), owner)?
            }
        };
        tracing::info!(chain = %chain.describe(), contract = %chain.contract_address(), "credit contract");
        Ok(Self {
            chain,
            posting: tokio::sync::Mutex::new(()),
            latest_tree: Mutex::new(None),
            audit_window_ms: config.audit_window_ms,
            claiming: Mutex::new(Default::default()),
        })
    }

    /// Builds the next epoch if there is new settled credit, and posts every built epoch that
    /// is not on-chain yet. Idempotent: run it as often as you like.
    pub async fn post_epoch(&self, db: &Db) -> Result<Posted> {
        let _posting = self.posting.lock().await;
        if let Some(recovered) = self.post_built_epochs(db).await? {
            return Ok(recovered);
        }
        let contract = self.contract_id();
        let Some(epoch) = self.build(db, &contract).await? else {
            return Ok(Posted::NothingNew {
                latest: self.latest_posted(db).await?.unwrap_or(0),
            });
        };
        tracing::info!(epoch, "epoch built");
        fault_point("crash-after-epoch-build");
        // Posted by the same code that recovers an epoch built before a crash.
        self.post_built_epochs(db).await?.ok_or_else(|| {
            CoordinatorError::Corrupt(format!("epoch {epoch} vanished after it was built"))
        })
    }

    /// Posts the epochs that were built but are not marked posted (after a crash, at start).
    pub async fn recover(&self, db: &Db) -> Result<Option<Posted>> {
        let _posting = self.posting.lock().await;
        self.post_built_epochs(db).await
    }

    fn contract_id(&self) -> String {
        self.chain
            .contract_address()
            .to_string()
            .to_ascii_lowercase()
    }

    /// Posts (or finds on-chain and marks) every built, unposted epoch; the last one, if any.
    async fn post_built_epochs(&self, db: &Db) -> Result<Option<Posted>> {
        let contract = self.contract_id();
        let mut last = None;
        while let Some(row) = sqlx::query(
            "SELECT epoch, root, total_micro, contributors, contract FROM epochs WHERE posted_ms IS NULL ORDER BY epoch LIMIT 1",
        )
        .fetch_optional(&db.pool)
        .await?
        {
            let epoch = row.try_get::<i64, _>("epoch")? as u64;
            let stored_contract: String = row.try_get("contract")?;
            if stored_contract != contract {
                return Err(CoordinatorError::Config(format!(
                    "epoch {epoch} was built for contract {stored_contract}, but the chain is configured with {contract}; \
                     start with the chain and contract the ledger was settled on (--chain-rpc, --chain-contract)"
                )));
            }
            let root = parse_root(&row.try_get::<String, _>("root")?)?;
            let total = row.try_get::<i64, _>("total_micro")? as u64;
            let contributors = row.try_get::<i64, _>("contributors")? as u64;
            let tx = self.post_built(epoch, root, total, contributors).await?;
            sqlx::query("UPDATE epochs SET tx_hash = $1, posted_ms = $2 WHERE epoch = $3")
                .bind(tx.as_ref().map(|t| t.tx_hash.to_string()))
                .bind(now_ms())
                .bind(epoch as i64)
                .execute(&db.pool)
                .await?;
            tracing::info!(epoch, %root, contributors, total_micro = total, "epoch posted");
            last = Some(Posted::Epoch {
                epoch,
                root,
                contributors,
                total_micro: total,
                tx,
            });
        }
        Ok(last)
    }

    /// Sends a built epoch's root, unless the chain already holds it.
    async fn post_built(
        &self,
        epoch: u64,
        root: B256,
        total: u64,
        contributors: u64,
    ) -> Result<Option<TxOutcome>> {
        let on_chain = self.chain.epoch_root(epoch).await?;
        if on_chain == root {
            tracing::info!(
                epoch,
                "the chain already holds this epoch's root (posted before a restart)"
            );
            return Ok(None);
        }
        if on_chain != B256::ZERO {
            return Err(CoordinatorError::Corrupt(format!(
                "the contract holds root {on_chain} for epoch {epoch}, but the ledger built {root}"
            )));
        }
        let latest = self.chain.latest_epoch().await?;
        if latest + 1 != epoch {
            return Err(CoordinatorError::Corrupt(format!(
                "the contract's latest epoch is {latest}, so epoch {epoch} cannot follow it; \
                 is this the contract the ledger was settled on?"
            )));
        }
        let tx = self
            .chain
            .post_epoch(epoch, root, U256::from(total), contributors)
            .await?;
        Ok(Some(tx))
    }

    /// Settles new credit into the next epoch and stores its root; `None` when there is none.
    async fn build(&self, db: &Db, contract: &str) -> Result<Option<u64>> {
        let _w = db.write().await;
        let mut tx = db.pool.begin().await?;
        let latest: Option<i64> = sqlx::query("SELECT MAX(epoch) AS e FROM epochs")
            .fetch_one(&mut *tx)
            .await?
            .try_get("e")?;
        let epoch = latest.unwrap_or(0) + 1;
        let settled = sqlx::query(
            "INSERT INTO settled (worker, unit_id, payout, epoch, credit_micro)
             SELECT c.worker, c.unit_id, w.payout, $1, c.credit_micro
             FROM credits c JOIN workers w ON w.key = c.worker
             WHERE w.payout IS NOT NULL AND w.banned = 0 AND c.issued_ms <= $2
               AND NOT EXISTS (SELECT 1 FROM settled s WHERE s.worker = c.worker AND s.unit_id = c.unit_id)",
        )
        .bind(epoch)
        .bind(now_ms() - self.audit_window_ms as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if settled == 0 {
            return Ok(None);
        }
        let entries = entries_from(
            sqlx::query(
                "SELECT payout, CAST(SUM(credit_micro) AS BIGINT) AS amount FROM settled GROUP BY payout",
            )
            .fetch_all(&mut *tx)
            .await?,
        )?;
        let tree = CreditTree::build(&entries)
            .ok_or_else(|| CoordinatorError::Corrupt("settled credit without entries".into()))?;
        let total: u64 = entries.iter().map(|e| e.amount.to::<u64>()).sum();
        sqlx::query(
            "INSERT INTO epochs (epoch, root, total_micro, contributors, settled_units, contract, built_ms, tx_hash, posted_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL)",
        )
        .bind(epoch)
        .bind(tree.root().to_string())
        .bind(total as i64)
        .bind(entries.len() as i64)
        .bind(settled as i64)
        .bind(contract)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(epoch as u64))
    }

    /// Refuses a chain that is behind the database: epochs the database posted to this
    /// contract are missing from it (its state was lost, say the embedded EVM's file was
    /// deleted, which redeploys an empty contract at the same address). Serving on would post
    /// nothing and answer every claim with an error.
    pub async fn check_chain(&self, db: &Db) -> Result<()> {
        let contract = self.contract_id();
        let posted: Option<i64> = sqlx::query(
            "SELECT MAX(epoch) AS e FROM epochs WHERE posted_ms IS NOT NULL AND contract = $1",
        )
        .bind(&contract)
        .fetch_one(&db.pool)
        .await?
        .try_get("e")?;
        let Some(posted) = posted else {
            return Ok(());
        };
        let on_chain = self.chain.latest_epoch().await?;
        if on_chain < posted as u64 {
            return Err(CoordinatorError::Config(format!(
                "the credit contract {} on {} is at epoch {on_chain}, but this database posted epoch {posted} to it: \
                 the chain's state was lost or this is another chain. Restore the chain's state \
                 (for the embedded EVM, DATA_DIR/chain/state.json from a backup), or name the chain \
                 that holds these epochs with --chain-rpc and --chain-contract; then start again",
                self.chain.contract_address(),
                self.chain.describe()
            )));
        }
        Ok(())
    }

    async fn latest_posted(&self, db: &Db) -> Result<Option<u64>> {
        let e: Option<i64> =
            sqlx::query("SELECT MAX(epoch) AS e FROM epochs WHERE posted_ms IS NOT NULL")
                .fetch_one(&db.pool)
                .await?
                .try_get("e")?;
        Ok(e.map(|e| e as u64))
    }

    /// The tree of the latest posted epoch (cached until the next one).
    async fn latest_tree(&self, db: &Db) -> Result<Option<Arc<EpochTree>>> {
        let Some(epoch) = self.latest_posted(db).await? else {
            return Ok(None);
        };
        if let Some(cached) = self.latest_tree.lock().expect("tree cache").as_ref()
            && cached.epoch == epoch
        {
            return Ok(Some(cached.clone()));
        }
        let entries = epoch_entries(db, epoch).await?;
        let tree = CreditTree::build(&entries)
            .ok_or_else(|| CoordinatorError::Corrupt(format!("epoch {epoch} has no entries")))?;
        let built = Arc::new(EpochTree {
            epoch,
            entries,
            tree,
        });
        *self.latest_tree.lock().expect("tree cache") = Some(built.clone());
        Ok(Some(built))
    }

    /// `account`'s cumulative amount and proof in the latest posted epoch.
    pub async fn proof(&self, db: &Db, account: Address) -> Result<Option<Proof>> {
        let Some(latest) = self.latest_tree(db).await? else {
            return Ok(None);
        };
        let Some(index) = latest.entries.iter().position(|e| e.account == account) else {
            return Ok(None);
        };
        Ok(Some(Proof {
            epoch: latest.epoch,
            root: latest.tree.root(),
            account,
            cumulative_micro: latest.entries[index].amount,
            proof: latest.tree.proof(index).unwrap_or_default(),
        }))
    }

    /// Claims `account`'s credit of the latest posted epoch, paying the gas (a relay for
    /// volunteers who hold none). Returns the proof used and the transaction, or `None` when
    /// there is nothing new to claim.
    pub async fn claim(&self, db: &Db, account: Address) -> Result<ClaimOutcome> {
        let Some(_claiming) = ClaimGuard::take(&self.claiming, account) else {
            return Ok(ClaimOutcome::Busy);
        };
        let Some(proof) = self.proof(db, account).await? else {
            return Ok(ClaimOutcome::NotInLedger);
        };
        let claimed = self.chain.claimed(account).await?;
        if claimed >= proof.cumulative_micro {
            return Ok(ClaimOutcome::AlreadyClaimed { proof, claimed });
        }
        let tx = self
            .chain
            .claim(account, proof.cumulative_micro, &proof.proof)
            .await?;
        Ok(ClaimOutcome::Claimed {
            amount: proof.cumulative_micro - claimed,
            proof,
            tx,
        })
    }

    /// Rebuilds the latest posted epoch's root from the credit rows (not from the stored root)
    /// and compares it with the stored root and the contract's.
    pub async fn verify(&self, db: &Db) -> Result<Option<Verification>> {
        let Some(epoch) = self.latest_posted(db).await? else {
            return Ok(None);
        };
        // From the credits themselves: every settled row must still be a credit with the same
        // amount, so a tampered `settled` table shows as a different root.
        let entries = entries_from(
            sqlx::query(
                "SELECT s.payout, CAST(SUM(c.credit_micro) AS BIGINT) AS amount
                 FROM settled s JOIN credits c ON c.worker = s.worker AND c.unit_id = s.unit_id
                 WHERE s.epoch <= $1 GROUP BY s.payout",
            )
            .bind(epoch as i64)
            .fetch_all(&db.pool)
            .await?,
        )?;
        let rebuilt = CreditTree::build(&entries).map_or(B256::ZERO, |t| t.root());
        let stored = parse_root(
            &sqlx::query("SELECT root FROM epochs WHERE epoch = $1")
                .bind(epoch as i64)
                .fetch_one(&db.pool)
                .await?
                .try_get::<String, _>("root")?,
        )?;
        let on_chain = self.chain.epoch_root(epoch).await?;
        Ok(Some(Verification {
            epoch,
            rebuilt,
            stored,
            on_chain,
            contributors: entries.len() as u64,
        }))
    }

    /// The public listing of an epoch: its root and every (address, cumulative amount), from
    /// which anyone can rebuild the root with `@openzeppelin/merkle-tree`.
    pub async fn epoch_listing(&self, db: &Db, epoch: u64) -> Result<Option<EpochListing>> {
        let row = sqlx::query(
            "SELECT root, total_micro, contributors, tx_hash, posted_ms FROM epochs WHERE epoch = $1 AND posted_ms IS NOT NULL",
        )
        .bind(epoch as i64)
        .fetch_optional(&db.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(EpochListing {
            epoch,
            root: parse_root(&row.try_get::<String, _>("root")?)?,
            total_micro: row.try_get::<i64, _>("total_micro")? as u64,
            tx_hash: row.try_get("tx_hash")?,
            posted_ms: row.try_get("posted_ms")?,
            entries: epoch_entries(db, epoch).await?,
        }))
    }

    pub async fn latest_epoch_number(&self, db: &Db) -> Result<Option<u64>> {
        self.latest_posted(db).await
    }
}

/// What a claim did.
#[derive(Debug, Clone)]
pub enum ClaimOutcome {
    /// The address has no settled credit in the latest posted epoch.
    NotInLedger,
    /// A claim for this address is being mined (or too many claims are): try again soon.
    Busy,
    /// Everything proven is claimed already.
    AlreadyClaimed { proof: Proof, claimed: U256 },
    Claimed {
        proof: Proof,
        amount: U256,
        tx: TxOutcome,
    },
}

/// Relayed claims sent and not yet mined, at most.
const MAX_CLAIMS_IN_FLIGHT: usize = 16;

/// An address's place among the claims in flight, given up when dropped (receipt or error).
struct ClaimGuard<'a> {
    set: &'a Mutex<std::collections::HashSet<Address>>,
    account: Address,
}

impl<'a> ClaimGuard<'a> {
    fn take(set: &'a Mutex<std::collections::HashSet<Address>>, account: Address) -> Option<Self> {
        let mut claiming = set.lock().expect("claims lock");
        if claiming.len() >= MAX_CLAIMS_IN_FLIGHT || !claiming.insert(account) {
            return None;
        }
        Some(ClaimGuard { set, account })
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("claims lock").remove(&self.account);
    }
}

/// A posted epoch and its entries.
#[derive(Debug, Clone)]
pub struct EpochListing {
    pub epoch: u64,
    pub root: B256,
    pub total_micro: u64,
    pub tx_hash: Option<String>,
    pub posted_ms: Option<i64>,
    pub entries: Vec<Entry>,
}

/// The entries of epoch `epoch`: every address's settled credit up to it, ordered by address.
async fn epoch_entries(db: &Db, epoch: u64) -> Result<Vec<Entry>> {
    entries_from(
        sqlx::query(
            "SELECT payout, CAST(SUM(credit_micro) AS BIGINT) AS amount FROM settled WHERE epoch <= $1 GROUP BY payout ORDER BY payout",
        )
        .bind(epoch as i64)
        .fetch_all(&db.pool)
        .await?,
    )
}

fn entries_from(rows: Vec<sqlx::any::AnyRow>) -> Result<Vec<Entry>> {
    rows.iter()
        .map(|r| {
            let amount: i64 = r.try_get("amount")?;
            Ok(Entry {
                account: parse_address(&r.try_get::<String, _>("payout")?)?,
                amount: U256::from(amount.max(0) as u64),
            })
        })
        .collect()
}

/// The coordinator's chain key (a secp256k1 secret): `TABULA_CHAIN_KEY` (64 hex digits) when
/// set, else the key file (`--chain-key-file`, default `data_dir/chain.key`, created on first
/// start in the format of every other key file).
pub fn chain_key(config: &Config) -> Result<[u8; 32]> {
    if let Some(text) = &config.chain_key {
        let digits = text.trim().strip_prefix("0x").unwrap_or(text.trim());
        return tabula_protocol::Bytes::<32>::from_hex(digits)
            .map(|b| b.0)
            .map_err(|_| {
                CoordinatorError::Config(
                    "TABULA_CHAIN_KEY must be 64 hex digits (a secp256k1 secret key, optionally 0x-prefixed)".into(),
                )
            });
    }
    let path = config
        .chain_key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("chain.key"));
    if config.chain_key_file.is_some() && !path.exists() {
        return Err(CoordinatorError::Config(format!(
            "the chain key file {} does not exist",
            path.display()
        )));
    }
    Ok(tabula_worker::keyfile::load_or_create_secret(
        &path,
        crate::db::random_bytes::<32>,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 8: two relayed claims for one address at once sent two transactions (the second
    /// reverted, paid for). One claim per address is in flight, and few claims overall.
    #[test]
    fn one_claim_per_address_is_in_flight() {
        let set = Mutex::new(std::collections::HashSet::new());
        let a = Address::repeat_byte(1);
        let first = ClaimGuard::take(&set, a).expect("the first claim");
        assert!(
            ClaimGuard::take(&set, a).is_none(),
            "a second claim at once"
        );
        drop(first);
        assert!(ClaimGuard::take(&set, a).is_some(), "after the receipt");
        let held: Vec<_> = (0..MAX_CLAIMS_IN_FLIGHT as u8)
            .map(|i| ClaimGuard::take(&set, Address::repeat_byte(10 + i)).unwrap())
            .collect();
        assert!(ClaimGuard::take(&set, Address::repeat_byte(200)).is_none());
        drop(held);
        assert!(set.lock().unwrap().is_empty());
    }

    /// Credit inside its audit window, and any credit of a banned worker, stays off-chain;
    /// older credit of a worker in good standing settles.
    #[tokio::test]
    async fn only_credit_past_its_audit_window_and_not_banned_settles() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            audit_window_ms: 60_000,
            ..Config::default()
        };
        let db = Db::open(&config.data_dir, None).await.unwrap();
        let settlement = Settlement::open(&config).await.unwrap();
        let now = now_ms();
        for (key, payout, banned) in [("honest", "0x01", 0), ("liar", "0x02", 1)] {
            sqlx::query(
                "INSERT INTO workers (key, payout, agent, verified, clean_streak, strikes, expired, banned, first_seen_ms, last_seen_ms)
                 VALUES ($1, $2, 'a', 1, 1, 0, 0, $3, 0, 0)",
            )
            .bind(key)
            .bind(format!("0x{}", payout.trim_start_matches("0x").repeat(20)))
            .bind(banned as i64)
            .execute(&db.pool)
            .await
            .unwrap();
        }
        for (worker, unit, issued) in [
            ("honest", "old", now - 120_000),
            ("honest", "new", now),
            ("liar", "old", now - 120_000),
        ] {
            sqlx::query(
                "INSERT INTO credits (worker, unit_id, lease_id, credit_micro, receipt, issued_ms) VALUES ($1, $2, 'l', 1000, '{}', $3)",
            )
            .bind(worker)
            .bind(unit)
            .bind(issued)
            .execute(&db.pool)
            .await
            .unwrap();
        }
        settlement.post_epoch(&db).await.unwrap();
        let settled: Vec<(String, String)> =
            sqlx::query("SELECT worker, unit_id FROM settled ORDER BY worker, unit_id")
                .fetch_all(&db.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get("worker"), r.get("unit_id")))
                .collect();
        assert_eq!(settled, vec![("honest".to_string(), "old".to_string())]);
        settlement.check_chain(&db).await.unwrap();
        // Finding 9: the embedded chain's state file is lost; a fresh contract appears at the
        // same address with no epochs. The coordinator refuses to serve on it, and says how
        // to recover.
        drop(settlement);
        std::fs::remove_file(dir.path().join("chain").join("state.json")).unwrap();
        let fresh = Settlement::open(&config).await.unwrap();
        let refusal = fresh.check_chain(&db).await.unwrap_err().to_string();
        assert!(refusal.contains("posted epoch 1"), "{refusal}");
        assert!(refusal.contains("state.json"), "{refusal}");
    }
}
