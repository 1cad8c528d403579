//! The in-process EVM: revm running the contract's bytecode over a state kept in one JSON file.
//!
//! Every operation is a short critical section: take a lock on `<state file>.lock` (exclusive
//! for transactions, shared for views), read the state file into an in-memory revm database,
//! execute, and for a successful transaction write the new state to `<state file>.tmp`, fsync
//! it and rename it over the state file. So several processes (and several [`EmbeddedChain`]s
//! in one process) may use the same file, a crash leaves the old or the new state but never a
//! torn one, and a view never waits for anything but a writer. The lock lives in a separate
//! file because the state file's inode changes with every rename.
//!
//! Transactions are real: they are validated (nonce, gas limit against a 30M block gas limit),
//! each runs in a block of its own (block number and timestamp advance), and `gas_used` is the
//! receipt's (intrinsic gas included, refunds deducted). Gas is priced at zero (the base fee
//! is zero), so the owner needs no ether. A transaction that reverts is not persisted: like a
//! node's gas estimation, the revert is reported and nothing is mined, so nonces and block
//! numbers stay those of successful transactions.
//!
//! The file stores accounts (nonce, balance, code, non-zero storage) in a format of our own
//! rather than revm's serde of its cache, so it survives revm upgrades.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{ErrorKind, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use alloy::sol_types::{SolCall, SolConstructor};
use alloy_primitives::{Address, B256, Bytes, U256, keccak256};
use revm::{
    Context, ExecuteCommitEvm, ExecuteEvm, MainBuilder, MainContext, MainnetEvm,
    bytecode::Bytecode,
    context::{TxEnv, result::ExecutionResult},
    database::{CacheDB, EmptyDB},
    handler::MainnetContext,
    primitives::{KECCAK_EMPTY, TxKind, eip7825::TX_GAS_LIMIT_CAP},
    state::AccountInfo,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::{ChainError, TxOutcome, bindings::TabulaCredit, revert_reason};

/// The chain id the embedded EVM reports to the contract (anvil's and hardhat's dev id).
const CHAIN_ID: u64 = 31337;
/// The block gas limit; a transaction's limit is this or EIP-7825's cap, whichever is lower.
const BLOCK_GAS_LIMIT: u64 = 30_000_000;
/// The version of the state file's format.
const FORMAT: u32 = 1;

/// The contract on the in-process EVM, its state in a file. Cheap to clone: it holds paths and
/// addresses, every operation reads the file afresh.
#[derive(Clone, Debug)]
pub struct EmbeddedChain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state_file: PathBuf,
    lock_file: PathBuf,
    tmp_file: PathBuf,
    owner: Address,
    contract: Address,
}

/// The state file.
#[derive(Serialize, Deserialize)]
struct StateFile {
    format: u32,
    chain_id: u64,
    owner: Address,
    contract: Address,
    /// The last executed block (one transaction per block).
    block_number: u64,
    /// Its timestamp (seconds since the Unix epoch).
    timestamp: u64,
    accounts: BTreeMap<Address, AccountFile>,
}

#[derive(Serialize, Deserialize)]
struct AccountFile {
    nonce: u64,
    balance: U256,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<Bytes>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    storage: BTreeMap<U256, U256>,
}

/// The state loaded for one operation.
struct World {
    db: CacheDB<EmptyDB>,
    block_number: u64,
    timestamp: u64,
}

enum Lock {
    Shared,
    Exclusive,
}

impl EmbeddedChain {
    /// Opens the EVM whose state is in `state_file`, creating it (with the contract deployed
    /// from `owner`) when the file does not exist. A file created for another owner is refused.
    pub fn open(state_file: &Path, owner: Address) -> Result<Self, ChainError> {
        let name = state_file
            .file_name()
            .ok_or_else(|| ChainError::State {
                path: state_file.to_path_buf(),
                message: "not a file name".to_string(),
            })?
            .to_string_lossy()
            .into_owned();
        let sibling = |suffix: &str| state_file.with_file_name(format!("{name}.{suffix}"));
        let mut inner = Inner {
            state_file: state_file.to_path_buf(),
            lock_file: sibling("lock"),
            tmp_file: sibling("tmp"),
            owner,
            contract: Address::ZERO,
        };
        if let Some(parent) = state_file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| ChainError::io(parent, e))?;
        }
        let _lock = inner.lock(Lock::Exclusive)?;
        match inner.read()? {
            Some(state) => {
                if state.owner != owner {
                    return Err(inner.state_error(format!(
                        "it was created for owner {}, not {owner}",
                        state.owner
                    )));
                }
                inner.contract = state.contract;
                debug!(state = %state_file.display(), contract = %state.contract, block = state.block_number, "embedded EVM opened");
            }
            None => {
                let mut world = World {
                    db: CacheDB::default(),
                    block_number: 0,
                    timestamp: 0,
                };
                let init = [
                    TabulaCredit::BYTECODE.as_ref(),
                    &TabulaCredit::constructorCall {
                        initialOwner: owner,
                    }
                    .abi_encode(),
                ]
                .concat();
                let (outcome, result) = world.transact(owner, TxKind::Create, init.into())?;
                let contract = match result {
                    ExecutionResult::Success { .. } => {
                        result.created_address().ok_or_else(|| {
                            ChainError::Evm("the deployment created no contract".to_string())
                        })?
                    }
                    other => return Err(failure(other)),
                };
                inner.contract = contract;
                inner.write(&world)?;
                info!(state = %state_file.display(), %contract, %owner, gas_used = outcome.gas_used, "embedded EVM created, credit contract deployed");
            }
        }
        Ok(EmbeddedChain {
            inner: Arc::new(inner),
        })
    }

    /// The contract's address.
    pub fn contract_address(&self) -> Address {
        self.inner.contract
    }

    /// The owner, who sends every transaction.
    pub fn owner(&self) -> Address {
        self.inner.owner
    }

    /// "embedded EVM (state in …)".
    pub fn describe(&self) -> String {
        format!(
            "embedded EVM (state in {})",
            self.inner.state_file.display()
        )
    }

    /// Runs `f` on tokio's blocking pool (it takes a file lock and does file I/O).
    pub(crate) async fn blocking<T, F>(self, f: F) -> Result<T, ChainError>
    where
        T: Send + 'static,
        F: FnOnce(&EmbeddedChain) -> Result<T, ChainError> + Send + 'static,
    {
        tokio::task::spawn_blocking(move || f(&self))
            .await
            .map_err(|e| ChainError::Evm(format!("the EVM task failed: {e}")))?
    }

    /// The last posted epoch (0 before the first).
    pub fn latest_epoch(&self) -> Result<u64, ChainError> {
        self.view(TabulaCredit::latestEpochCall {})
    }

    /// The root posted for `epoch`, zero when not posted.
    pub fn epoch_root(&self, epoch: u64) -> Result<B256, ChainError> {
        self.view(TabulaCredit::epochRootCall { epoch })
    }

    /// The cumulative amount `account` has claimed.
    pub fn claimed(&self, account: Address) -> Result<U256, ChainError> {
        self.view(TabulaCredit::claimedCall { account })
    }

    /// The token balance of `account`.
    pub fn balance_of(&self, account: Address) -> Result<U256, ChainError> {
        self.view(TabulaCredit::balanceOfCall { account })
    }

    /// Posts the root of `epoch`, sent by the owner.
    pub fn post_epoch(
        &self,
        epoch: u64,
        root: B256,
        total_credit: U256,
        contributors: u64,
    ) -> Result<TxOutcome, ChainError> {
        let outcome = self.send(TabulaCredit::postEpochCall {
            epoch,
            root,
            totalCredit: total_credit,
            contributors: U256::from(contributors),
        })?;
        info!(epoch, %root, %total_credit, contributors, tx = %outcome.tx_hash, gas_used = outcome.gas_used, "epoch posted on the embedded EVM");
        Ok(outcome)
    }

    /// Claims for `account`, relayed by the owner.
    pub fn claim(
        &self,
        account: Address,
        cumulative: U256,
        proof: &[B256],
    ) -> Result<TxOutcome, ChainError> {
        let outcome = self.send(TabulaCredit::claimCall {
            account,
            cumulativeAmount: cumulative,
            proof: proof.to_vec(),
        })?;
        info!(%account, %cumulative, tx = %outcome.tx_hash, gas_used = outcome.gas_used, "claim executed on the embedded EVM");
        Ok(outcome)
    }

    /// Calls a view function without persisting anything.
    fn view<C: SolCall>(&self, call: C) -> Result<C::Return, ChainError> {
        let inner = &self.inner;
        let mut world = {
            let _lock = inner.lock(Lock::Shared)?;
            inner.load()?
        };
        let output = world.call(inner.contract, call.abi_encode().into())?;
        C::abi_decode_returns(&output)
            .map_err(|e| ChainError::Evm(format!("undecodable return of {}: {e}", C::SIGNATURE)))
    }

    /// Sends a transaction from the owner to the contract and persists its effects.
    fn send<C: SolCall>(&self, call: C) -> Result<TxOutcome, ChainError> {
        let inner = &self.inner;
        let _lock = inner.lock(Lock::Exclusive)?;
        let mut world = inner.load()?;
        let (outcome, result) = world.transact(
            inner.owner,
            TxKind::Call(inner.contract),
            call.abi_encode().into(),
        )?;
        match result {
            ExecutionResult::Success { .. } => {
                inner.write(&world)?;
                Ok(outcome)
            }
            other => {
                debug!(
                    function = C::SIGNATURE,
                    "embedded transaction reverted, not persisted"
                );
                Err(failure(other))
            }
        }
    }
}

/// The error for a transaction or call that did not succeed.
fn failure(result: ExecutionResult) -> ChainError {
    match result {
        ExecutionResult::Revert { output, .. } => ChainError::Reverted {
            reason: revert_reason(&output),
        },
        ExecutionResult::Halt { reason, .. } => ChainError::Reverted {
            reason: format!("the EVM halted: {reason:?}"),
        },
        ExecutionResult::Success { .. } => unreachable!("failure() of a success"),
    }
}

/// An EVM over `db` in block `number` at `timestamp`; calls (`check_nonce` false) run from any
/// nonce, as `eth_call` does.
fn evm(
    db: &mut CacheDB<EmptyDB>,
    number: u64,
    timestamp: u64,
    check_nonce: bool,
) -> MainnetEvm<MainnetContext<&mut CacheDB<EmptyDB>>> {
    Context::mainnet()
        .with_db(db)
        .modify_cfg_chained(|cfg| {
            cfg.chain_id = CHAIN_ID;
            cfg.disable_nonce_check = !check_nonce;
        })
        .modify_block_chained(|block| {
            block.number = U256::from(number);
            block.timestamp = U256::from(timestamp);
            block.gas_limit = BLOCK_GAS_LIMIT;
            block.basefee = 0;
        })
        .build_mainnet()
}

impl World {
    /// Executes a transaction in a new block and commits it to `self.db`.
    fn transact(
        &mut self,
        caller: Address,
        kind: TxKind,
        data: Bytes,
    ) -> Result<(TxOutcome, ExecutionResult), ChainError> {
        let number = self.block_number + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let timestamp = now.max(self.timestamp + 1);
        let nonce = self
            .db
            .cache
            .accounts
            .get(&caller)
            .map_or(0, |a| a.info.nonce);
        let tx_hash = keccak256([&number.to_be_bytes()[..], caller.as_slice(), &data].concat());
        let tx = TxEnv::builder()
            .caller(caller)
            .kind(kind)
            .data(data)
            .nonce(nonce)
            .chain_id(Some(CHAIN_ID))
            .gas_limit(BLOCK_GAS_LIMIT.min(TX_GAS_LIMIT_CAP))
            .gas_price(0)
            .build()
            .map_err(|e| ChainError::Evm(format!("invalid transaction: {e:?}")))?;
        let result = evm(&mut self.db, number, timestamp, true)
            .transact_commit(tx)
            .map_err(|e| ChainError::Evm(format!("transaction refused: {e}")))?;
        // A reverted transaction is not persisted (the caller drops this world), so the block
        // only advances for successful ones.
        if result.is_success() {
            self.block_number = number;
            self.timestamp = timestamp;
        }
        let outcome = TxOutcome {
            tx_hash,
            gas_used: result.tx_gas_used(),
        };
        Ok((outcome, result))
    }

    /// Calls `to` with `data` at the current state (as `eth_call` would) and returns the output.
    fn call(&mut self, to: Address, data: Bytes) -> Result<Bytes, ChainError> {
        let tx = TxEnv::builder()
            .caller(Address::ZERO)
            .kind(TxKind::Call(to))
            .data(data)
            .chain_id(Some(CHAIN_ID))
            .gas_limit(BLOCK_GAS_LIMIT.min(TX_GAS_LIMIT_CAP))
            .gas_price(0)
            .build()
            .map_err(|e| ChainError::Evm(format!("invalid call: {e:?}")))?;
        let (number, timestamp) = (self.block_number, self.timestamp);
        let result = evm(&mut self.db, number, timestamp, false)
            .transact(tx)
            .map_err(|e| ChainError::Evm(format!("call refused: {e}")))?
            .result;
        match result {
            ExecutionResult::Success { output, .. } => Ok(output.into_data()),
            other => Err(failure(other)),
        }
    }
}

/// Holds a file lock until dropped.
struct LockGuard(File);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl Inner {
    fn state_error(&self, message: String) -> ChainError {
        ChainError::State {
            path: self.state_file.clone(),
            message,
        }
    }

    fn lock(&self, kind: Lock) -> Result<LockGuard, ChainError> {
        let path = &self.lock_file;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ChainError::io(path, e))?;
        match kind {
            Lock::Shared => file.lock_shared(),
            Lock::Exclusive => file.lock(),
        }
        .map_err(|e| ChainError::io(path, e))?;
        Ok(LockGuard(file))
    }

    /// The state file, or `None` when it does not exist (or is empty).
    fn read(&self) -> Result<Option<StateFile>, ChainError> {
        let path = &self.state_file;
        let bytes = match std::fs::read(path) {
            Ok(bytes) if bytes.is_empty() => return Ok(None),
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ChainError::io(path, e)),
        };
        let state: StateFile = serde_json::from_slice(&bytes)
            .map_err(|e| self.state_error(format!("unreadable: {e}")))?;
        if state.format != FORMAT {
            return Err(self.state_error(format!(
                "format {} is not the supported {FORMAT}",
                state.format
            )));
        }
        if state.chain_id != CHAIN_ID {
            return Err(self.state_error(format!(
                "chain id {} is not the embedded EVM's {CHAIN_ID}",
                state.chain_id
            )));
        }
        Ok(Some(state))
    }

    /// Loads the state file into a revm database. It must exist (it is created by `open`).
    fn load(&self) -> Result<World, ChainError> {
        let state = self
            .read()?
            .ok_or_else(|| self.state_error("the state file has disappeared".to_string()))?;
        if state.contract != self.contract {
            return Err(self.state_error(format!(
                "the contract is now at {}, not {} (was the file replaced?)",
                state.contract, self.contract
            )));
        }
        let mut db = CacheDB::<EmptyDB>::default();
        for (address, account) in state.accounts {
            let mut info = AccountInfo {
                balance: account.balance,
                nonce: account.nonce,
                ..Default::default()
            };
            if let Some(code) = account.code {
                let code = Bytecode::new_raw(code);
                info.code_hash = code.hash_slow();
                info.code = Some(code);
            }
            db.insert_account_info(address, info);
            for (slot, value) in account.storage {
                db.insert_account_storage(address, slot, value)
                    .expect("an in-memory database cannot fail");
            }
        }
        Ok(World {
            db,
            block_number: state.block_number,
            timestamp: state.timestamp,
        })
    }

    /// Writes `world` atomically: temporary file, fsync, rename, fsync of the directory.
    fn write(&self, world: &World) -> Result<(), ChainError> {
        let mut accounts = BTreeMap::new();
        for (address, account) in &world.db.cache.accounts {
            let Some(info) = account.info() else { continue };
            let code = if info.code_hash == KECCAK_EMPTY || info.code_hash.is_zero() {
                None
            } else {
                let code = info
                    .code
                    .clone()
                    .or_else(|| world.db.cache.contracts.get(&info.code_hash).cloned())
                    .ok_or_else(|| self.state_error(format!("the code of {address} is missing")))?;
                Some(code.original_bytes())
            };
            let storage: BTreeMap<U256, U256> = account
                .storage
                .iter()
                .filter(|(_, value)| !value.is_zero())
                .map(|(slot, value)| (*slot, *value))
                .collect();
            if info.nonce == 0 && info.balance.is_zero() && code.is_none() && storage.is_empty() {
                continue;
            }
            accounts.insert(
                *address,
                AccountFile {
                    nonce: info.nonce,
                    balance: info.balance,
                    code,
                    storage,
                },
            );
        }
        let state = StateFile {
            format: FORMAT,
            chain_id: CHAIN_ID,
            owner: self.owner,
            contract: self.contract,
            block_number: world.block_number,
            timestamp: world.timestamp,
            accounts,
        };
        let json = serde_json::to_vec_pretty(&state).expect("the state serialises");
        let tmp = &self.tmp_file;
        let mut file = File::create(tmp).map_err(|e| ChainError::io(tmp, e))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(|e| ChainError::io(tmp, e))?;
        drop(file);
        std::fs::rename(tmp, &self.state_file).map_err(|e| ChainError::io(&self.state_file, e))?;
        if let Some(dir) = self
            .state_file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            // Makes the rename durable; not every platform can open a directory, hence best effort.
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
}
