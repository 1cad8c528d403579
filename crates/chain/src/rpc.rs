//! Any EVM chain over JSON-RPC (alloy): the same bytecode, deployed once and then addressed by
//! the address remembered in a deployment file (or given by the operator).
//!
//! Transactions are signed locally with the given key; alloy fills in nonce, gas (from
//! `eth_estimateGas`, which is where a revert is normally caught: nothing is sent then) and
//! EIP-1559 fees, and we wait for the receipt.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use alloy::{
    contract::{CallBuilder, CallDecoder},
    network::{Ethereum, ReceiptResponse},
    providers::{DynProvider, Provider, ProviderBuilder},
    signers::local::PrivateKeySigner,
    transports::http::reqwest::Url,
};
use alloy_primitives::{Address, B256, U256};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{ChainError, TxOutcome, bindings::TabulaCredit, revert_reason};

/// How long to wait for a sent transaction to be mined before giving up on it.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(300);

type Instance = TabulaCredit::TabulaCreditInstance<DynProvider>;

/// The contract on a chain reached over JSON-RPC.
#[derive(Clone, Debug)]
pub struct RpcChain {
    contract: Instance,
    chain_id: u64,
    /// Held from filling a transaction (nonce) until the node has accepted it.
    send_lock: Arc<tokio::sync::Mutex<()>>,
    /// The URL without path, query or credentials (they may hold an API key).
    endpoint: String,
}

/// Where the contract was deployed, so that a restart reuses it.
#[derive(Serialize, Deserialize)]
struct Deployment {
    chain_id: u64,
    contract: Address,
    deployed_by: Address,
}

/// The signer of a 32-byte secp256k1 secret key.
pub(crate) fn signer(key: &[u8; 32]) -> Result<PrivateKeySigner, ChainError> {
    PrivateKeySigner::from_bytes(&B256::from(*key))
        .map_err(|e| ChainError::InvalidKey(e.to_string()))
}

/// The error of a failed contract call: a revert with its reason, or the node's failure.
fn call_error(action: &'static str, error: alloy::contract::Error) -> ChainError {
    match error.as_revert_data() {
        Some(data) => ChainError::Reverted {
            reason: revert_reason(&data),
        },
        None => ChainError::Rpc {
            action,
            message: error.to_string(),
        },
    }
}

fn rpc_error(action: &'static str, error: impl std::fmt::Display) -> ChainError {
    ChainError::Rpc {
        action,
        message: error.to_string(),
    }
}

impl RpcChain {
    /// Connects to `url`, signing with `signer_key`; see [`crate::Chain::rpc`].
    pub async fn connect(
        url: &str,
        signer_key: &[u8; 32],
        contract: Option<Address>,
        deployment_file: &Path,
    ) -> Result<Self, ChainError> {
        let signer = signer(signer_key)?;
        let me = signer.address();
        let parsed: Url = url.parse().map_err(|e| ChainError::InvalidUrl {
            url: url.to_string(),
            message: format!("{e}"),
        })?;
        let endpoint = match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", parsed.scheme()),
            (Some(host), None) => format!("{}://{host}", parsed.scheme()),
            _ => parsed.scheme().to_string(),
        };
        // Not the recommended fillers: their cached nonce manager takes a nonce even when the
        // gas estimate then fails (a revert), leaving a gap that blocks every later
        // transaction. The simple manager asks for the pending count each time; `send_lock`
        // keeps our own sends from racing for it.
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .fetch_chain_id()
            .wallet(signer)
            .connect_http(parsed)
            .erased();
        let chain_id = provider
            .get_chain_id()
            .await
            .map_err(|e| rpc_error("eth_chainId", e))?;

        let address = match contract {
            Some(address) => address,
            None => match read_deployment(deployment_file)? {
                Some(deployment) if deployment.chain_id != chain_id => {
                    return Err(ChainError::Deployment {
                        path: deployment_file.to_path_buf(),
                        message: format!(
                            "it is for chain {}, but {endpoint} is chain {chain_id}",
                            deployment.chain_id
                        ),
                    });
                }
                Some(deployment) => deployment.contract,
                None => deploy(&provider, me, chain_id, deployment_file).await?,
            },
        };

        let code = provider
            .get_code_at(address)
            .await
            .map_err(|e| rpc_error("eth_getCode", e))?;
        if code.is_empty() {
            let message = format!("no contract at {address} on chain {chain_id}");
            return Err(match contract {
                Some(_) => ChainError::Rpc {
                    action: "checking the contract",
                    message,
                },
                None => ChainError::Deployment {
                    path: deployment_file.to_path_buf(),
                    message: format!(
                        "{message} (was the chain reset? delete the file to deploy anew)"
                    ),
                },
            });
        }
        let contract = TabulaCredit::new(address, provider);
        match contract.owner().call().await {
            Ok(owner) if owner != me => {
                warn!(%address, %owner, signer = %me, "the signer is not the credit contract's owner: posting epochs will revert");
            }
            Ok(_) => {}
            Err(e) => return Err(call_error("owner()", e)),
        }
        info!(chain_id, %endpoint, %address, signer = %me, "credit contract on JSON-RPC chain");
        Ok(RpcChain {
            contract,
            chain_id,
            send_lock: Arc::default(),
            endpoint,
        })
    }

    /// The contract's address.
    pub fn contract_address(&self) -> Address {
        *self.contract.address()
    }

    /// The chain id the node reported.
    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// "chain 31337 at http://127.0.0.1:8545".
    pub fn describe(&self) -> String {
        format!("chain {} at {}", self.chain_id, self.endpoint)
    }

    /// The last posted epoch (0 before the first).
    pub async fn latest_epoch(&self) -> Result<u64, ChainError> {
        self.contract
            .latestEpoch()
            .call()
            .await
            .map_err(|e| call_error("latestEpoch()", e))
    }

    /// The root posted for `epoch`, zero when not posted.
    pub async fn epoch_root(&self, epoch: u64) -> Result<B256, ChainError> {
        self.contract
            .epochRoot(epoch)
            .call()
            .await
            .map_err(|e| call_error("epochRoot()", e))
    }

    /// The cumulative amount `account` has claimed.
    pub async fn claimed(&self, account: Address) -> Result<U256, ChainError> {
        self.contract
            .claimed(account)
            .call()
            .await
            .map_err(|e| call_error("claimed()", e))
    }

    /// The token balance of `account`.
    pub async fn balance_of(&self, account: Address) -> Result<U256, ChainError> {
        self.contract
            .balanceOf(account)
            .call()
            .await
            .map_err(|e| call_error("balanceOf()", e))
    }

    /// Posts the root of `epoch`; the signer must be the owner.
    pub async fn post_epoch(
        &self,
        epoch: u64,
        root: B256,
        total_credit: U256,
        contributors: u64,
    ) -> Result<TxOutcome, ChainError> {
        let call = self
            .contract
            .postEpoch(epoch, root, total_credit, U256::from(contributors));
        let outcome = self.send("postEpoch()", call).await?;
        info!(chain_id = self.chain_id, epoch, %root, %total_credit, contributors, tx = %outcome.tx_hash, gas_used = outcome.gas_used, "epoch posted");
        Ok(outcome)
    }

    /// Claims for `account`, sent (and paid for) by the signer.
    pub async fn claim(
        &self,
        account: Address,
        cumulative: U256,
        proof: &[B256],
    ) -> Result<TxOutcome, ChainError> {
        let call = self.contract.claim(account, cumulative, proof.to_vec());
        let outcome = self.send("claim()", call).await?;
        info!(chain_id = self.chain_id, %account, %cumulative, tx = %outcome.tx_hash, gas_used = outcome.gas_used, "claim mined");
        Ok(outcome)
    }

    /// Sends `call` and waits for its receipt. A transaction that reverts on chain (after a
    /// successful gas estimate: the state changed in between) is replayed with `eth_call` to
    /// recover its reason.
    async fn send<D: CallDecoder>(
        &self,
        action: &'static str,
        call: CallBuilder<&DynProvider, D, Ethereum>,
    ) -> Result<TxOutcome, ChainError> {
        let pending = {
            let _guard = self.send_lock.lock().await;
            call.send().await.map_err(|e| call_error(action, e))?
        };
        let receipt = pending
            .with_timeout(Some(RECEIPT_TIMEOUT))
            .get_receipt()
            .await
            .map_err(|e| rpc_error(action, e))?;
        let tx_hash = receipt.transaction_hash();
        if !receipt.status() {
            let reason = match call.call_raw().await {
                Err(e) => match call_error(action, e) {
                    ChainError::Reverted { reason } => reason,
                    other => format!("unknown ({other})"),
                },
                Ok(_) => "unknown (the call succeeds now)".to_string(),
            };
            return Err(ChainError::Reverted {
                reason: format!("{reason} (transaction {tx_hash} reverted on chain)"),
            });
        }
        Ok(TxOutcome {
            tx_hash,
            gas_used: receipt.gas_used(),
        })
    }
}

/// Deploys the contract owned by `owner` and records it in `deployment_file`.
async fn deploy(
    provider: &DynProvider,
    owner: Address,
    chain_id: u64,
    deployment_file: &Path,
) -> Result<Address, ChainError> {
    info!(chain_id, %owner, "deploying the credit contract");
    let pending = TabulaCredit::deploy_builder(provider, owner)
        .send()
        .await
        .map_err(|e| call_error("deploying the contract", e))?;
    let receipt = pending
        .with_timeout(Some(RECEIPT_TIMEOUT))
        .get_receipt()
        .await
        .map_err(|e| rpc_error("deploying the contract", e))?;
    let contract = match (receipt.status(), receipt.contract_address()) {
        (true, Some(address)) => address,
        _ => {
            return Err(ChainError::Reverted {
                reason: format!(
                    "the deployment transaction {} failed",
                    receipt.transaction_hash()
                ),
            });
        }
    };
    write_deployment(
        deployment_file,
        &Deployment {
            chain_id,
            contract,
            deployed_by: owner,
        },
    )?;
    info!(chain_id, %contract, tx = %receipt.transaction_hash(), gas_used = receipt.gas_used(), file = %deployment_file.display(), "credit contract deployed");
    Ok(contract)
}

fn read_deployment(path: &Path) -> Result<Option<Deployment>, ChainError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ChainError::Deployment {
                path: path.to_path_buf(),
                message: format!("unreadable: {e}"),
            }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ChainError::io(path, e)),
    }
}

/// Writes the deployment file atomically (temporary file + rename).
fn write_deployment(path: &Path, deployment: &Deployment) -> Result<(), ChainError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ChainError::io(parent, e))?;
    }
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let json = serde_json::to_vec_pretty(deployment).expect("a deployment serialises");
    std::fs::write(&tmp, json).map_err(|e| ChainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ChainError::io(path, e))
}
