//! `tabula chain`: the credit contract from the command line, on the coordinator's own data
//! (the same database and chain `tabula serve` uses; both may run at once).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tabula_chain::Address;
use tabula_coordinator::{
    Config,
    db::Db,
    settlement::{ClaimOutcome, Posted, Settlement},
};

use crate::cluster::StoreArgs;

/// Which chain holds the credit contract.
#[derive(Args, Clone)]
pub struct ChainOptions {
    /// An EVM JSON-RPC endpoint (any chain, e.g. http://127.0.0.1:8545 for anvil) for the credit
    /// contract [default: the embedded EVM, whose state lives in the data dir].
    #[arg(long, env = "TABULA_CHAIN_RPC")]
    chain_rpc: Option<String>,
    /// The credit contract's address on --chain-rpc [default: deployed on first use and
    /// remembered in the data dir].
    #[arg(long, env = "TABULA_CHAIN_CONTRACT")]
    chain_contract: Option<String>,
    /// The file holding the coordinator's chain key (a secp256k1 secret, 64 hex digits): it
    /// owns the contract and pays for posts and relayed claims. The environment variable
    /// TABULA_CHAIN_KEY may hold the key itself instead [default: DATA_DIR/chain.key, created on
    /// first start].
    #[arg(long, env = "TABULA_CHAIN_KEY_FILE")]
    chain_key_file: Option<PathBuf>,
    /// Minutes before verified credit may settle on-chain: an audit may still find, inside
    /// this window, that it was earned by lying (a banned worker's credit never settles).
    /// 0 settles at once.
    #[arg(long, env = "TABULA_AUDIT_WINDOW_MINUTES", default_value_t = 30.0)]
    audit_window_minutes: f64,
}

impl ChainOptions {
    /// `config` with these options (and `TABULA_CHAIN_KEY`) applied.
    pub fn apply(&self, mut config: Config) -> Result<Config> {
        config.chain_rpc = self.chain_rpc.clone();
        config.chain_contract = self
            .chain_contract
            .as_deref()
            .map(|a| parse_address(a, "--chain-contract"))
            .transpose()?;
        config.chain_key_file = self.chain_key_file.clone();
        config.chain_key = std::env::var("TABULA_CHAIN_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        if !(0.0..=43_200.0).contains(&self.audit_window_minutes) {
            bail!("--audit-window-minutes must be between 0 and 43200 (30 days)");
        }
        config.audit_window_ms = (self.audit_window_minutes * 60_000.0) as u64;
        Ok(config)
    }
}

#[derive(Args)]
pub struct ChainArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    chain: ChainOptions,
}

#[derive(Subcommand)]
pub enum ChainCommand {
    /// Settle the credit verified since the last epoch and post its Merkle root (one
    /// transaction, whatever the number of contributors). Posts an epoch left unposted by a
    /// crash first; does nothing when there is no new credit.
    PostEpoch(ChainArgs),
    /// Claim an address's credit of the latest epoch: the coordinator's key pays the gas, the
    /// credit token goes to the address.
    Claim {
        /// The payout address (0x and 40 hex digits).
        #[arg(long)]
        address: String,
        #[command(flatten)]
        args: ChainArgs,
    },
    /// Rebuild the latest epoch's root from the ledger's credit rows and compare it with the
    /// stored root and the contract's; with --coordinator, rebuild it from that coordinator's
    /// public listing instead (what any auditor can do). Exits with an error when they differ.
    Verify {
        /// Audit a coordinator from the outside: its public epoch listing
        /// (`/v1/ledger/epochs/latest`) against the contract on --chain-rpc (the contract's
        /// address comes from the listing unless --chain-contract is given).
        #[arg(long)]
        coordinator: Option<String>,
        #[command(flatten)]
        args: ChainArgs,
    },
    /// The chain, the contract and the latest epoch.
    Status(ChainArgs),
}

fn parse_address(text: &str, what: &str) -> Result<Address> {
    tabula_chain::parse_address(text).with_context(|| {
        format!("{what} must be an EVM address: 0x followed by 40 hex digits (got `{text}`)")
    })
}

fn micro(amount: impl std::fmt::Display) -> String {
    let text = amount.to_string();
    let value: f64 = text.parse().unwrap_or(f64::NAN);
    format!("{:.6} credits ({text} µ)", value / 1e6)
}

async fn open(args: &ChainArgs) -> Result<(Db, Settlement)> {
    let config = Config {
        data_dir: args.store.data_dir(),
        database_url: args.store.database_url.clone(),
        ..args.chain.apply(Config::default())?
    };
    let db = Db::open(&config.data_dir, config.database_url.as_deref())
        .await
        .with_context(|| {
            format!(
                "opening the coordinator's data in {}",
                config.data_dir.display()
            )
        })?;
    let settlement = Settlement::open(&config).await?;
    Ok((db, settlement))
}

pub fn run(command: ChainCommand) -> Result<()> {
    crate::cluster::runtime()?.block_on(async move {
        match command {
            ChainCommand::PostEpoch(args) => post_epoch(&args).await,
            ChainCommand::Claim { address, args } => {
                claim(&args, parse_address(&address, "--address")?).await
            }
            ChainCommand::Verify {
                coordinator: Some(url),
                args,
            } => verify_public(&args, &url).await,
            ChainCommand::Verify {
                coordinator: None,
                args,
            } => verify(&args).await,
            ChainCommand::Status(args) => status(&args).await,
        }
    })
}

async fn post_epoch(args: &ChainArgs) -> Result<()> {
    let (db, settlement) = open(args).await?;
    match settlement.post_epoch(&db).await? {
        Posted::NothingNew { latest } => println!(
            "no new credit to settle {}: workers earn it with verified units, and it settles once they link a payout address",
            if latest == 0 {
                "yet".to_string()
            } else {
                format!("since epoch {latest}")
            }
        ),
        Posted::Epoch {
            epoch,
            root,
            contributors,
            total_micro,
            tx,
        } => {
            println!("epoch {epoch}: root {root}");
            println!("  {contributors} addresses, {} in all", micro(total_micro));
            match tx {
                Some(tx) => println!(
                    "  posted in transaction {} ({} gas)",
                    tx.tx_hash, tx.gas_used
                ),
                None => println!("  already on-chain (posted before a restart); marked posted"),
            }
            println!(
                "  contract {} on {}",
                settlement.chain.contract_address(),
                settlement.chain.describe()
            );
        }
    }
    Ok(())
}

async fn claim(args: &ChainArgs, account: Address) -> Result<()> {
    let (db, settlement) = open(args).await?;
    match settlement.claim(&db, account).await? {
        ClaimOutcome::Busy => {
            bail!("a claim for {account} is being mined now; try again in a few seconds")
        }
        ClaimOutcome::NotInLedger => bail!(
            "{account} has no settled credit: a worker must link it as its payout address, earn verified credit, and an epoch must be posted (`tabula chain post-epoch`)"
        ),
        ClaimOutcome::AlreadyClaimed { proof, claimed } => println!(
            "{account} already claimed everything up to epoch {}: {}",
            proof.epoch,
            micro(claimed)
        ),
        ClaimOutcome::Claimed { proof, amount, tx } => {
            println!(
                "claimed {} for {account} (epoch {})",
                micro(amount),
                proof.epoch
            );
            println!("  transaction {} ({} gas)", tx.tx_hash, tx.gas_used);
        }
    }
    let balance = settlement.chain.balance_of(account).await?;
    println!("  balance: {} TABC", micro(balance));
    Ok(())
}

async fn verify(args: &ChainArgs) -> Result<()> {
    let (db, settlement) = open(args).await?;
    let Some(v) = settlement.verify(&db).await? else {
        println!("no epoch has been posted yet: nothing to verify");
        return Ok(());
    };
    println!("epoch {} ({} addresses)", v.epoch, v.contributors);
    println!("  rebuilt from the ledger: {}", v.rebuilt);
    println!("  stored when built:       {}", v.stored);
    println!("  on-chain:                {}", v.on_chain);
    if !v.matches() {
        bail!("the roots differ: the ledger, the stored epoch and the chain do not agree");
    }
    println!("all three agree");
    Ok(())
}

async fn verify_public(args: &ChainArgs, coordinator: &str) -> Result<()> {
    let url = format!(
        "{}/v1/ledger/epochs/latest",
        coordinator.trim_end_matches('/')
    );
    let body = crate::loadgen::http_get(&url).with_context(|| format!("fetching {url}"))?;
    let listing: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{url} is not JSON"))?;
    let field = |name: &str| {
        listing[name]
            .as_str()
            .with_context(|| format!("{url} has no `{name}`"))
    };
    let epoch = listing["epoch"]
        .as_u64()
        .with_context(|| format!("{url} has no `epoch`"))?;
    let published: tabula_chain::B256 = field("root")?.parse()?;
    let entries = listing["entries"]
        .as_array()
        .with_context(|| format!("{url} has no `entries`"))?
        .iter()
        .map(|e| {
            Ok(tabula_chain::merkle::Entry {
                account: parse_address(e[0].as_str().unwrap_or_default(), "an entry's address")?,
                amount: e[1].as_str().unwrap_or_default().parse()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rebuilt = tabula_chain::merkle::CreditTree::build(&entries)
        .context("the listing has no entries")?
        .root();
    let mut config = Config {
        data_dir: args.store.data_dir(),
        ..args.chain.apply(Config::default())?
    };
    if config.chain_contract.is_none() {
        config.chain_contract = Some(parse_address(field("contract")?, "the listing's contract")?);
    }
    let settlement = Settlement::open(&config).await?;
    let on_chain = settlement.chain.epoch_root(epoch).await?;
    println!(
        "epoch {epoch} of {coordinator} ({} addresses)",
        entries.len()
    );
    println!("  rebuilt from the listing: {rebuilt}");
    println!("  published root:           {published}");
    println!("  on-chain ({}): {on_chain}", settlement.chain.describe());
    if rebuilt != published || published != on_chain {
        bail!("the roots differ: the coordinator's listing does not match the chain");
    }
    println!("all three agree");
    Ok(())
}

async fn status(args: &ChainArgs) -> Result<()> {
    let (db, settlement) = open(args).await?;
    let chain = &settlement.chain;
    println!("chain:    {}", chain.describe());
    println!("contract: {}", chain.contract_address());
    println!("on-chain latest epoch: {}", chain.latest_epoch().await?);
    match settlement.latest_epoch_number(&db).await? {
        Some(e) => println!("ledger latest posted epoch: {e}"),
        None => println!("ledger: no epoch posted yet"),
    }
    Ok(())
}
