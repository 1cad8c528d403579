//! `tabula bench-pipeline`: SmolLM2 in exact precision as 1, 2 or 3 pipeline stages on this
//! machine, each stage with its own key, activations between stages over real WebRTC data
//! channels on loopback (or an in-process channel, the framing alone), every activation
//! checked against its sender's signed commitment as a receiving stage does. Reports decode
//! tokens/s, the time per hop and the bytes on the wire per token, next to the whole model
//! run without stages in the same process; the tokens must equal the whole model's.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tabula_engine::cpu::CpuBackend;
use tabula_models::{
    catalog::SMOLLM2,
    exact::{ExactArch, ExactFile, ExactLlama, split_pieces, stage_ranges, stage_slice},
    gguf::GgufFile,
    sampling::ExactSampler,
    tokenize::LlamaTokenizer,
};
use tabula_protocol::{Activation, Bytes, Identity, MAX_ACTIVATION, decode, encode};
use tabula_transport::{
    ChannelLink, Link, MAX_MESSAGE,
    native::{Role, RtcOptions, connect},
};
use tabula_worker::stage::{StageOut, StagePlan, StageRunner};

#[derive(Args)]
pub struct PipelineBenchArgs {
    /// Stage counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    stages: Vec<usize>,
    /// Tokens to generate (greedy) after the prompt.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// The chat prompt.
    #[arg(long, default_value = "Explain in two sentences why the sky is blue.")]
    prompt: String,
    /// Where the models are (default: `TABULA_MODELS`, else ~/.cache/tabula/models).
    #[arg(long)]
    models_dir: Option<std::path::PathBuf>,
}

/// One measured configuration.
struct Row {
    stages: usize,
    path: &'static str,
    prefill: Duration,
    decode: Duration,
    hops: Duration,
    hop_count: usize,
    wire_bytes: usize,
    tokens: Vec<u32>,
}

enum AnyLink {
    Rtc(tabula_transport::native::RtcLink),
    Channel(ChannelLink),
}

impl AnyLink {
    async fn send(&self, m: &[u8]) -> Result<(), tabula_transport::TransportError> {
        match self {
            AnyLink::Rtc(l) => l.send(m).await,
            AnyLink::Channel(l) => l.send(m).await,
        }
    }
    async fn recv(&self) -> Result<Vec<u8>, tabula_transport::TransportError> {
        match self {
            AnyLink::Rtc(l) => l.recv().await,
            AnyLink::Channel(l) => l.recv().await,
        }
    }
    async fn close(&self) {
        match self {
            AnyLink::Rtc(l) => l.close().await,
            AnyLink::Channel(l) => l.close().await,
        }
    }
}

/// A connected pair of direct links on loopback, signalling through in-process channels.
async fn rtc_pair() -> Result<(AnyLink, AnyLink)> {
    let options = || RtcOptions {
        bind: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 0))],
        connect_timeout: Duration::from_secs(10),
        limit: MAX_MESSAGE,
    };
    let (a_out, mut a_out_rx) = tokio::sync::mpsc::unbounded_channel();
    let (b_out, mut b_out_rx) = tokio::sync::mpsc::unbounded_channel();
    let (a_in_tx, a_in) = tokio::sync::mpsc::channel(64);
    let (b_in_tx, b_in) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(s) = a_out_rx.recv().await {
            if b_in_tx.send(s).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(s) = b_out_rx.recv().await {
            if a_in_tx.send(s).await.is_err() {
                break;
            }
        }
    });
    let (a, b) = tokio::join!(
        connect(Role::Offerer, a_out, a_in, options()),
        connect(Role::Answerer, b_out, b_in, options())
    );
    Ok((AnyLink::Rtc(a?), AnyLink::Rtc(b?)))
}

pub fn bench_pipeline(args: PipelineBenchArgs) -> Result<()> {
    if args.tokens == 0 || args.tokens > 512 {
        bail!("--tokens must be 1 to 512");
    }
    let dir = crate::models_dir(args.models_dir.clone());
    let gguf_path = dir.join(SMOLLM2.files[0].local_path);
    let gguf = std::fs::read(&gguf_path).with_context(|| {
        format!(
            "cannot read {}; run `tabula models fetch`",
            gguf_path.display()
        )
    })?;
    let tokenizer = LlamaTokenizer::from_gguf(&GgufFile::parse(&gguf)?)?;
    let prompt = tokenizer.encode(&tokenizer.chat_prompt(&args.prompt)?)?;
    let (path, hash) = crate::quantize::exact_file(&dir, &SMOLLM2)?;
    let whole = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let pieces = split_pieces(&whole, &hash)?;
    let file = ExactFile::open(&whole, &hash)?;
    let ExactArch::Llama(config) = &file.header.config else {
        bail!("SmolLM2's exact file is not a Llama");
    };
    let layers = config.layers;
    for &n in &args.stages {
        if n == 0 || n > layers {
            bail!("--stages: 1 to {layers} stages");
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    // The whole model, no stages: the baseline every row must equal.
    let model = ExactLlama::load(&CpuBackend, &file)?;
    let started = Instant::now();
    let mut sampler = ExactSampler::greedy();
    let mut first = None;
    let (steps, _) = pollster::block_on(model.generate(
        &CpuBackend,
        &prompt,
        args.tokens,
        &mut sampler,
        &[],
        |_| {
            first.get_or_insert_with(Instant::now);
        },
    ))?;
    let first = first.unwrap_or_else(Instant::now);
    let whole_tokens: Vec<u32> = steps.iter().map(|s| s.token).collect();
    rows.push(Row {
        stages: 1,
        path: "whole model",
        prefill: first - started,
        decode: first.elapsed(),
        hops: Duration::ZERO,
        hop_count: 0,
        wire_bytes: 0,
        tokens: whole_tokens.clone(),
    });
    drop(model);

    for &n in args.stages.iter().filter(|&&n| n > 1) {
        for path in ["webrtc", "channel"] {
            let keys: Vec<Identity> = (0..n)
                .map(|i| Identity::from_seed([70 + i as u8; 32]))
                .collect();
            let ranges = stage_ranges(layers, n)?;
            let mut runners = Vec::new();
            for (i, r) in ranges.iter().enumerate() {
                let stage_file = ExactFile::open_pieces(&stage_slice(&pieces, layers, r))?;
                runners.push(StageRunner::load(
                    &CpuBackend,
                    &stage_file,
                    StagePlan {
                        session: Bytes([1; 16]),
                        stage: i as u16,
                        layers: r.clone(),
                        capacity: prompt.len() + args.tokens,
                        upstream: (i > 0).then(|| keys[i - 1].public()),
                        first_step: 0,
                        temperature_milli: 0,
                        top_p_q16: 65536,
                        seed: 0,
                    },
                )?);
            }
            let row = runtime.block_on(async {
                let mut links = Vec::new();
                for _ in 1..n {
                    links.push(match path {
                        "webrtc" => rtc_pair().await?,
                        _ => {
                            let (a, b) = ChannelLink::pair(MAX_MESSAGE);
                            (AnyLink::Channel(a), AnyLink::Channel(b))
                        }
                    });
                }
                let mut row = Row {
                    stages: n,
                    path: if path == "webrtc" {
                        "WebRTC data channels (loopback)"
                    } else {
                        "in-process channel (framing only)"
                    },
                    prefill: Duration::ZERO,
                    decode: Duration::ZERO,
                    hops: Duration::ZERO,
                    hop_count: 0,
                    wire_bytes: 0,
                    tokens: Vec::new(),
                };
                let mut next = prompt.clone();
                let started = Instant::now();
                let mut decode_started = None;
                while row.tokens.len() < args.tokens {
                    let mut out = runners[0].run_tokens(&CpuBackend, &keys[0], &next).await?;
                    for (i, (send, recv)) in links.iter().enumerate() {
                        let StageOut::Activation(a) = &out else {
                            bail!("stage {i} gave a token")
                        };
                        let frame = encode(a);
                        let hop = Instant::now();
                        let (sent, got) = tokio::join!(send.send(&frame), recv.recv());
                        sent?;
                        let got: Activation = decode(&got?, MAX_ACTIVATION + 4096)?;
                        if decode_started.is_some() {
                            row.hops += hop.elapsed();
                            row.hop_count += 1;
                            row.wire_bytes += frame.len();
                        }
                        out = runners[i + 1]
                            .run_activation(&CpuBackend, &keys[i + 1], &got)
                            .await?;
                    }
                    let StageOut::Token { token, .. } = out else {
                        bail!("the last stage gave no token")
                    };
                    row.tokens.push(token);
                    next = vec![token];
                    decode_started.get_or_insert_with(Instant::now);
                }
                let decode_started = decode_started.expect("at least one token");
                row.prefill = decode_started - started;
                row.decode = decode_started.elapsed();
                for (a, b) in &links {
                    a.close().await;
                    b.close().await;
                }
                Ok::<_, anyhow::Error>(row)
            })?;
            if row.tokens != whole_tokens {
                bail!(
                    "{n} stages over {} gave other tokens than the whole model",
                    row.path
                );
            }
            rows.push(row);
        }
    }

    println!(
        "SmolLM2-135M exact, CPU, {} prompt tokens + {} greedy tokens; every row's tokens equal the whole model's",
        prompt.len(),
        args.tokens
    );
    println!(
        "| stages | activations over | prefill ms | decode tokens/s | ms per hop (decode) | bytes on the wire per token |"
    );
    println!("|---|---|---|---|---|---|");
    let decode_steps = (args.tokens.max(2) - 1) as f64;
    for r in &rows {
        let per_hop = if r.hop_count > 0 {
            format!("{:.3}", r.hops.as_secs_f64() * 1e3 / r.hop_count as f64)
        } else {
            "–".into()
        };
        println!(
            "| {} | {} | {:.0} | {:.1} | {per_hop} | {} |",
            r.stages,
            r.path,
            r.prefill.as_secs_f64() * 1e3,
            decode_steps / r.decode.as_secs_f64(),
            (r.wire_bytes as f64 / decode_steps).round(),
        );
    }
    Ok(())
}
