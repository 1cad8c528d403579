//! Tokenizers: a Hugging Face `tokenizer.json` for BERT models, and a byte-level BPE rebuilt
//! from GGUF metadata (tokens, merges, token types, chat template) for Llama-family models.

use tokenizers::{
    AddedToken, SplitDelimiterBehavior, Tokenizer, TruncationParams,
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::{BPE, Vocab},
    pre_tokenizers::{
        PreTokenizerWrapper, byte_level::ByteLevel, digits::Digits, sequence::Sequence,
        split::Split,
    },
};

use crate::{ModelError, Result, gguf::GgufFile};

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// WordPiece tokenizer of a BERT model: adds `[CLS]`/`[SEP]`, truncates to `max_len` tokens,
/// never pads (the engine batches sequences of different lengths itself).
pub struct BertTokenizer {
    inner: Tokenizer,
    max_len: usize,
}

impl BertTokenizer {
    pub fn from_json(bytes: &[u8], max_len: usize) -> Result<Self> {
        let mut inner = Tokenizer::from_bytes(bytes).map_err(tok_err)?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(tok_err)?;
        Ok(Self { inner, max_len })
    }

    /// The most tokens [`Self::encode`] returns (longer texts are truncated).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// One more than the largest id the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_BYTE: i32 = 6;

/// The chat template of architectures whose GGUF files carry none (Gemma 3's, without the BOS:
/// [`LlamaTokenizer::encode`] adds it). A system message is prefixed to the first user turn.
const GEMMA_CHAT_TEMPLATE: &str = "\
{%- if messages[0].role == 'system' -%}\
{%- set sys = messages[0].content ~ '\n\n' -%}{%- set rest = messages[1:] -%}\
{%- else -%}{%- set sys = '' -%}{%- set rest = messages -%}{%- endif -%}\
{%- for m in rest -%}\
<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n\
{{ (sys if loop.first else '') ~ m.content | trim }}<end_of_turn>\n\
{% endfor -%}\
{%- if add_generation_prompt -%}<start_of_turn>model\n{% endif -%}";

/// The tokenizer models a GGUF may name (`tokenizer.ggml.model`).
enum Model {
    /// Byte-level BPE with merges (`gpt2`: SmolLM2, Llama 3, Qwen2).
    Bpe(Box<Tokenizer>),
    /// SentencePiece BPE with scores (`llama`: Llama 2, Mistral, Gemma).
    Spm(Box<Spm>),
}

/// Byte-level BPE tokenizer of a Llama-family GGUF, with its chat template.
pub struct LlamaTokenizer {
    model: Model,
    /// Every token's text, by id.
    tokens: Vec<String>,
    chat_template: Option<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation: EOS and the chat end-of-turn marker when present.
    pub stop: Vec<u32>,
    pub add_bos: bool,
}

/// The most tokens a GGUF vocabulary may hold (Gemma 3 has 262 144).
const MAX_VOCAB: usize = 1 << 20;

impl LlamaTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let kind = gguf.get_str("tokenizer.ggml.model")?;
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        if tokens.is_empty() || tokens.len() > MAX_VOCAB {
            return Err(tok_err(format!(
                "{} tokens (a vocabulary holds 1 to {MAX_VOCAB})",
                tokens.len()
            )));
        }
        let types = gguf
            .get_i32_array("tokenizer.ggml.token_type")
            .unwrap_or_default();
        let type_of = |i: usize| types.get(i).copied().unwrap_or(TOKEN_TYPE_NORMAL);
        let special: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|&(i, _)| matches!(type_of(i), TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let model = match kind {
            "gpt2" => Model::Bpe(Box::new(byte_level_bpe(gguf, &tokens, &special)?)),
            "llama" => {
                let scores = gguf.get_f32_array("tokenizer.ggml.scores")?;
                if scores.len() != tokens.len() {
                    return Err(tok_err(format!(
                        "{} scores for {} tokens",
                        scores.len(),
                        tokens.len()
                    )));
                }
                let add_space_prefix = !matches!(
                    gguf.get("tokenizer.ggml.add_space_prefix"),
                    Some(crate::gguf::MetaValue::Bool(false))
                );
                Model::Spm(Box::new(Spm::new(
                    &tokens,
                    &scores,
                    &type_of,
                    special,
                    add_space_prefix,
                )?))
            }
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "tokenizer model `{other}` is not supported (byte-level BPE `gpt2` and \
                     SentencePiece `llama` are)"
                )));
            }
        };
        let id_of = |key: &str| {
            gguf.get_u32(key)
                .ok()
                .filter(|&id| (id as usize) < tokens.len())
        };
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos = id_of("tokenizer.ggml.eos_token_id");
        let mut stop: Vec<u32> = eos.into_iter().collect();
        for marker in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(id) = tokens.iter().position(|t| *t == marker) {
                stop.push(id as u32);
            }
        }
        let add_bos = matches!(
            gguf.get("tokenizer.ggml.add_bos_token"),
            Some(crate::gguf::MetaValue::Bool(true))
        );
        let chat_template = match gguf.get_str("tokenizer.chat_template") {
            Ok(t) => Some(t.to_string()),
            Err(_) if gguf.get_str("general.architecture").ok() == Some("gemma3") => {
                Some(GEMMA_CHAT_TEMPLATE.to_string())
            }
            Err(_) => None,
        };
        Ok(Self {
            model,
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            chat_template,
            bos,
            eos,
            stop,
            add_bos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) are
    /// recognised. A BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        match &self.model {
            Model::Bpe(inner) => {
                ids.extend_from_slice(inner.encode(text, false).map_err(tok_err)?.get_ids())
            }
            Model::Spm(spm) => spm.encode(text, &mut ids),
        }
        Ok(ids)
    }

    /// The text of `ids`, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.model {
            Model::Bpe(inner) => inner.decode(ids, true).map_err(tok_err),
            Model::Spm(spm) => Ok(spm.decode(&self.tokens, ids)),
        }
    }

    /// Renders the GGUF's chat template for one user message with the generation prompt.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        self.chat_prompt_messages(&[("user", user)])
    }

    /// The prompt for a conversation of `(role, content)` messages, ending with the
    /// assistant's turn, through the model's chat template.
    pub fn chat_prompt_messages(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let token = |id: Option<u32>| {
            id.and_then(|id| self.tokens.get(id as usize).cloned())
                .unwrap_or_default()
        };
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages
                        .iter()
                        .map(|(role, content)| minijinja::context! { role => role, content => content })
                        .collect::<Vec<_>>(),
                    add_generation_prompt => true,
                    bos_token => token(self.bos),
                    eos_token => token(self.eos),
                })
            })
            .map_err(|e| ModelError::Template(e.to_string()))
    }
}

/// llama.cpp's Qwen2 pre-tokeniser (`tokenizer.ggml.pre` `qwen2`): contractions in any case,
/// a word with one leading non-letter, each digit alone, punctuation runs, newlines.
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's Llama 3 pre-tokeniser (`llama-bpe`, `llama3`): Qwen2's, with digits in
/// groups of up to three.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's pre-tokeniser.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// What llama.cpp splits by, in turn, for a byte-level BPE that names no pre-tokeniser (or
/// `default`).
const DEFAULT_SPLITS: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_SPLIT,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// The pre-tokenisation llama.cpp applies for a GGUF's `tokenizer.ggml.pre`: its regexes in
/// turn (each splits every piece the one before left, keeping what it does not match as
/// pieces too), then the byte-level mapping. Another name is refused by name: tokens split
/// another way would be wrong without any error.
fn pre_tokenizer(pre: Option<&str>) -> Result<Sequence> {
    let split = |regexes: &[&str]| -> Result<Vec<PreTokenizerWrapper>> {
        let mut steps = regexes
            .iter()
            .map(|regex| {
                Ok(Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex((*regex).into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tok_err)?
                .into())
            })
            .collect::<Result<Vec<PreTokenizerWrapper>>>()?;
        steps.push(ByteLevel::new(false, true, false).into());
        Ok(steps)
    };
    Ok(Sequence::new(match pre.unwrap_or("default") {
        "smollm" => {
            let mut steps = vec![Digits::new(true).into()];
            steps.extend(split(&[GPT2_SPLIT])?);
            steps
        }
        "gpt-2" => split(&[GPT2_SPLIT])?,
        "qwen2" | "deepseek-r1-qwen" => split(&[QWEN2_SPLIT])?,
        "llama-bpe" | "llama3" | "llama-v3" => split(&[LLAMA3_SPLIT])?,
        "default" => split(&DEFAULT_SPLITS)?,
        other => {
            return Err(tok_err(format!(
                "pre-tokeniser `{}` (tokenizer.ggml.pre) is not supported: smollm, gpt-2, qwen2, \
                 llama-bpe (Llama 3) and default are",
                other.escape_debug()
            )));
        }
    }))
}

/// The byte-level BPE of a `gpt2` GGUF: its merges, llama.cpp's pre-tokenisation for its
/// `tokenizer.ggml.pre` ([`pre_tokenizer`]), and its control and user-defined tokens matched
/// whole.
fn byte_level_bpe(
    gguf: &GgufFile,
    tokens: &[&str],
    special: &[(String, u32)],
) -> Result<Tokenizer> {
    let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| tok_err(format!("malformed merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(tok_err)?;
    let mut inner = Tokenizer::new(bpe);
    let pre = gguf.get_str("tokenizer.ggml.pre").ok();
    inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = special
        .iter()
        .map(|(tok, _)| AddedToken::from(tok.clone(), true))
        .collect();
    inner.add_special_tokens(&special);
    Ok(inner)
}

/// SentencePiece's word-boundary marker, which stands for a space.
const SPACE_MARK: &str = "\u{2581}";

/// SentencePiece BPE as llama.cpp runs it (`llm_tokenizer_spm`): spaces become `▁`, then the
/// adjacent pair whose concatenation is the highest-scoring token merges first (the leftmost
/// among equals), until no pair is a token; a piece that is no token falls back to its UTF-8
/// bytes (`<0xNN>`). Control and user-defined tokens written in the text are matched first,
/// leftmost-longest, and never merged into.
struct Spm {
    /// Mergeable (normal) tokens by text.
    ids: std::collections::HashMap<String, u32>,
    scores: Vec<f32>,
    /// The token of each byte value, when the vocabulary has it.
    bytes: Vec<Option<u32>>,
    unk: Option<u32>,
    /// Control and user-defined tokens by text, and the lengths they come in (longest first).
    special: std::collections::HashMap<String, u32>,
    special_lens: Vec<usize>,
    /// Bytes a special token can start with.
    special_first: [bool; 256],
    /// Token ids that are left out of decoded text (control tokens).
    hidden: std::collections::HashSet<u32>,
    /// Token ids that stand for one byte, with the byte.
    byte_of: std::collections::HashMap<u32, u8>,
    add_space_prefix: bool,
}

impl Spm {
    fn new(
        tokens: &[&str],
        scores: &[f32],
        type_of: &dyn Fn(usize) -> i32,
        special: Vec<(String, u32)>,
        add_space_prefix: bool,
    ) -> Result<Self> {
        let mut ids = std::collections::HashMap::new();
        let mut bytes = vec![None; 256];
        let mut byte_of = std::collections::HashMap::new();
        let mut hidden = std::collections::HashSet::new();
        for (i, t) in tokens.iter().enumerate() {
            match type_of(i) {
                TOKEN_TYPE_NORMAL => {
                    ids.entry(t.to_string()).or_insert(i as u32);
                }
                TOKEN_TYPE_BYTE => {
                    let b = t
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| tok_err(format!("byte token `{t}` is not <0xNN>")))?;
                    bytes[b as usize] = Some(i as u32);
                    byte_of.insert(i as u32, b);
                }
                TOKEN_TYPE_CONTROL => {
                    hidden.insert(i as u32);
                }
                _ => {}
            }
        }
        let unk = tokens.iter().position(|t| *t == "<unk>").map(|i| i as u32);
        let mut special_first = [false; 256];
        let mut special_lens: Vec<usize> = Vec::new();
        let mut by_text = std::collections::HashMap::new();
        for (text, id) in special {
            let Some(&first) = text.as_bytes().first() else {
                continue;
            };
            special_first[first as usize] = true;
            if !special_lens.contains(&text.len()) {
                special_lens.push(text.len());
            }
            by_text.entry(text).or_insert(id);
        }
        special_lens.sort_unstable_by(|a, b| b.cmp(a));
        Ok(Self {
            ids,
            scores: scores.to_vec(),
            bytes,
            unk,
            special: by_text,
            special_lens,
            special_first,
            hidden,
            byte_of,
            add_space_prefix,
        })
    }

    /// The special token starting at byte `at` of `text`, longest first: its length and id.
    fn special_at(&self, text: &str, at: usize) -> Option<(usize, u32)> {
        if !self.special_first[text.as_bytes()[at] as usize] {
            return None;
        }
        self.special_lens.iter().find_map(|&len| {
            let piece = text.get(at..at + len)?;
            self.special.get(piece).map(|&id| (len, id))
        })
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut start = 0;
        let mut at = 0;
        let mut first = true;
        while at < text.len() {
            if !text.is_char_boundary(at) {
                at += 1;
                continue;
            }
            if let Some((len, id)) = self.special_at(text, at) {
                self.encode_piece(&text[start..at], first, out);
                out.push(id);
                first = false;
                at += len;
                start = at;
            } else {
                at += 1;
            }
        }
        self.encode_piece(&text[start..], first, out);
    }

    /// One stretch of text without special tokens.
    fn encode_piece(&self, text: &str, first: bool, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut normalized = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && first {
            normalized.push_str(SPACE_MARK);
        }
        normalized.push_str(&text.replace(' ', SPACE_MARK));
        // Symbols: byte ranges of `normalized`, linked left and right; merged ones are empty.
        let mut sym: Vec<(usize, usize)> = normalized
            .char_indices()
            .map(|(i, c)| (i, i + c.len_utf8()))
            .collect();
        let n = sym.len();
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let mut next: Vec<Option<usize>> = (0..n).map(|i| Some(i + 1).filter(|&j| j < n)).collect();
        // Max-heap on (score, leftmost first); each entry remembers the text length it merges.
        #[derive(PartialEq)]
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl Eq for Bigram {}
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for Bigram {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.score
                    .total_cmp(&other.score)
                    .then(other.left.cmp(&self.left))
            }
        }
        let mut queue = std::collections::BinaryHeap::new();
        let bigram = |sym: &[(usize, usize)], l: usize, r: usize| -> Option<Bigram> {
            let text = &normalized[sym[l].0..sym[r].1];
            let id = *self.ids.get(text)?;
            Some(Bigram {
                score: self.scores[id as usize],
                left: l,
                right: r,
                len: text.len(),
            })
        };
        for i in 1..n {
            queue.extend(bigram(&sym, i - 1, i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            let live = |s: (usize, usize)| s.1 > s.0;
            if !live(sym[l]) || !live(sym[r]) || next[l] != Some(r) || sym[r].1 - sym[l].0 != b.len
            {
                continue; // stale: one side merged since
            }
            sym[l].1 = sym[r].1;
            sym[r] = (0, 0);
            next[l] = next[r];
            if let Some(nr) = next[r] {
                prev[nr] = Some(l);
            }
            if let Some(pl) = prev[l] {
                queue.extend(bigram(&sym, pl, l));
            }
            if let Some(nl) = next[l] {
                queue.extend(bigram(&sym, l, nl));
            }
        }
        let mut i = Some(0);
        while let Some(at) = i {
            let (a, b) = sym[at];
            let piece = &normalized[a..b];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for byte in piece.bytes() {
                        out.extend(self.bytes[byte as usize].or(self.unk));
                    }
                }
            }
            i = next[at];
        }
    }

    fn decode(&self, tokens: &[String], ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if self.hidden.contains(&id) {
                continue;
            }
            if let Some(&b) = self.byte_of.get(&id) {
                bytes.push(b);
            } else if let Some(t) = tokens.get(id as usize) {
                bytes.extend_from_slice(t.replace(SPACE_MARK, " ").as_bytes());
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match text.strip_prefix(' ') {
            Some(rest) if self.add_space_prefix => rest.to_string(),
            _ => text,
        }
    }
}
