//! Judging one step of a pipeline session from the members' reports alone: no I/O, no
//! clock. Two kinds of fault are found here. A member proven wrong by signatures — its own
//! commitment does not verify, its input is not what its upstream signed, its upstream signed
//! two different outputs for one step — is named at once. Otherwise the pipelines are
//! compared: the first stage whose inputs agree across pipelines and whose outputs differ is
//! the one to re-execute (the referee then knows who lied); with no such stage and equal
//! tokens, the step is agreed.

use tabula_protocol::{Hash, PublicKey, SessionId, StageReport, sign::SignerKey};

/// One position's report for the step being judged.
#[derive(Clone, Debug)]
pub struct Reported {
    pub key: PublicKey,
    pub report: StageReport,
}

/// What a step's reports say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepVerdict {
    /// Every pipeline computed the same thing: the next token.
    Agreed { token: u32 },
    /// The member at (`pipeline`, `stage`) is wrong by the signatures alone.
    Proven {
        pipeline: usize,
        stage: usize,
        why: String,
    },
    /// Pipelines first part at `stage`: same input, different output (or, at the last stage,
    /// the same logits and different tokens). Re-execute that stage to find the liar.
    Diverged { stage: usize },
}

/// Judges step `step` of `session`. `reports[p][s]` is pipeline `p`'s stage `s`;
/// `inputs[p]` is the hash of the tokens pipeline `p`'s first stage was given.
pub fn judge(
    session: &SessionId,
    step: u32,
    inputs: &[Hash],
    reports: &[Vec<Reported>],
) -> StepVerdict {
    assert_eq!(inputs.len(), reports.len(), "one input per pipeline");
    assert!(!reports.is_empty(), "at least one pipeline");
    let stages = reports[0].len();
    assert!(
        reports.iter().all(|p| p.len() == stages),
        "pipelines of equal length"
    );
    for (p, pipeline) in reports.iter().enumerate() {
        if let Some((stage, why)) = check_chain(session, step, &inputs[p], pipeline) {
            return StepVerdict::Proven {
                pipeline: p,
                stage,
                why,
            };
        }
    }
    for s in 0..stages {
        let first = &reports[0][s].report.commit;
        let same_input = reports
            .iter()
            .all(|p| p[s].report.commit.input_hash == first.input_hash);
        let same_output = reports
            .iter()
            .all(|p| p[s].report.commit.output_hash == first.output_hash);
        if same_input && !same_output {
            return StepVerdict::Diverged { stage: s };
        }
    }
    let last = stages - 1;
    let token = reports[0][last]
        .report
        .token
        .expect("checked by check_chain");
    let logits_agree = reports
        .iter()
        .all(|p| p[last].report.commit.output_hash == reports[0][last].report.commit.output_hash);
    if reports.iter().all(|p| p[last].report.token == Some(token)) && logits_agree {
        StepVerdict::Agreed { token }
    } else {
        // Different logits from different inputs (pipelines that started at different
        // steps) or the same logits and different tokens: the last stage decides.
        StepVerdict::Diverged { stage: last }
    }
}

/// The first member of one pipeline that its own or its upstream's signatures prove wrong.
fn check_chain(
    session: &SessionId,
    step: u32,
    input: &Hash,
    pipeline: &[Reported],
) -> Option<(usize, String)> {
    let last = pipeline.len() - 1;
    for (s, r) in pipeline.iter().enumerate() {
        let c = &r.report.commit;
        if c.session != *session || c.step != step || c.stage as usize != s {
            return Some((
                s,
                format!(
                    "a commitment for step {} stage {} reported as step {step} stage {s}",
                    c.step, c.stage
                ),
            ));
        }
        let Ok(key) = SignerKey::parse(&r.key) else {
            return Some((s, "an unreadable key".into()));
        };
        if c.verify(&key).is_err() {
            return Some((s, "its commitment's signature does not verify".into()));
        }
        if (s == last) != r.report.token.is_some() {
            return Some((
                s,
                "a token from a stage that is not the last, or none from the last".into(),
            ));
        }
        if s == 0 {
            if r.report.received.is_some() {
                return Some((s, "the first stage claims an upstream".into()));
            }
            if c.input_hash != *input {
                return Some((s, "its input hash is not the tokens it was given".into()));
            }
            continue;
        }
        let up = &pipeline[s - 1];
        let Some(received) = &r.report.received else {
            return Some((s, "no upstream commitment with its input".into()));
        };
        let Ok(up_key) = SignerKey::parse(&up.key) else {
            return Some((s - 1, "an unreadable key".into()));
        };
        if received.session != *session
            || received.step != step
            || received.stage as usize != s - 1
            || received.verify(&up_key).is_err()
        {
            return Some((
                s,
                "its input was not signed by its upstream for this step".into(),
            ));
        }
        if received.output_hash != c.input_hash {
            return Some((s, "its input hash is not what its upstream sent".into()));
        }
        if received.output_hash != up.report.commit.output_hash {
            return Some((
                s - 1,
                "it signed two different outputs for one step (one reported, one sent)".into(),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use tabula_protocol::{Bytes, Identity, sha256};

    use super::*;

    const SESSION: SessionId = Bytes([7; 16]);

    /// A pipeline of `keys` run honestly from `input`: stage `s` outputs `hash(s, input)`.
    fn pipeline(keys: &[Identity], step: u32, input: Hash, token: u32) -> Vec<Reported> {
        let mut prev: Option<tabula_protocol::StageCommit> = None;
        let mut inp = input;
        keys.iter()
            .enumerate()
            .map(|(s, k)| {
                let out = sha256(&[&inp.0[..], &[s as u8]].concat());
                let commit = k.stage_commit(SESSION, step, s as u16, inp, out);
                let r = Reported {
                    key: k.public(),
                    report: StageReport {
                        commit: commit.clone(),
                        received: prev.take(),
                        token: (s + 1 == keys.len()).then_some(token),
                    },
                };
                prev = Some(commit);
                inp = out;
                r
            })
            .collect()
    }

    fn keys(seed: u8) -> Vec<Identity> {
        (0..3)
            .map(|i| Identity::from_seed([seed + i; 32]))
            .collect()
    }

    #[test]
    fn honest_pipelines_agree_on_the_token() {
        let input = sha256(b"prompt");
        let a = pipeline(&keys(1), 4, input, 42);
        let b = pipeline(&keys(10), 4, input, 42);
        assert_eq!(
            judge(&SESSION, 4, &[input, input], &[a, b]),
            StepVerdict::Agreed { token: 42 }
        );
    }

    /// A member that signs a consistent but wrong output (a flipped activation byte) is
    /// found as the first stage where inputs agree and outputs differ.
    #[test]
    fn a_wrong_output_is_the_first_divergent_stage() {
        let input = sha256(b"prompt");
        let ka = keys(1);
        let a = pipeline(&ka, 0, input, 42);
        let mut b = pipeline(&keys(10), 0, input, 42);
        // Stage 1 of pipeline b lies: it outputs another hash, and stage 2 computes on it.
        let kb = keys(10);
        let lie = sha256(b"lie");
        b[1].report.commit = kb[1].stage_commit(SESSION, 0, 1, b[1].report.commit.input_hash, lie);
        let out2 = sha256(b"downstream of the lie");
        b[2].report.commit = kb[2].stage_commit(SESSION, 0, 2, lie, out2);
        b[2].report.received = Some(b[1].report.commit.clone());
        assert_eq!(
            judge(&SESSION, 0, &[input, input], &[a.clone(), b.clone()]),
            StepVerdict::Diverged { stage: 1 }
        );
        // Two colluders in one pipeline: still the first of them.
        let mut c = b.clone();
        c[2].report.commit = kb[2].stage_commit(SESSION, 0, 2, lie, a[2].report.commit.output_hash);
        c[2].report.received = Some(c[1].report.commit.clone());
        assert_eq!(
            judge(&SESSION, 0, &[input, input], &[a, c]),
            StepVerdict::Diverged { stage: 1 }
        );
    }

    #[test]
    fn signatures_alone_name_forgers_replayers_and_equivocators() {
        let input = sha256(b"prompt");
        let ka = keys(1);
        let good = pipeline(&ka, 3, input, 42);
        let other = pipeline(&keys(10), 3, input, 42);
        let proven =
            |p: Vec<Reported>| match judge(&SESSION, 3, &[input, input], &[p, other.clone()]) {
                StepVerdict::Proven {
                    pipeline: 0, stage, ..
                } => Some(stage),
                _ => None,
            };
        // A wrong input hash: stage 1 signs an input its upstream never sent.
        let mut p = good.clone();
        p[1].report.commit =
            ka[1].stage_commit(SESSION, 3, 1, sha256(b"x"), p[1].report.commit.output_hash);
        assert_eq!(proven(p), Some(1));
        // A replayed commitment of another stage (stage 0's, reported by stage 1).
        let mut p = good.clone();
        p[1].report.commit = p[0].report.commit.clone();
        assert_eq!(proven(p), Some(1));
        // Another step's commitment.
        let mut p = good.clone();
        p[2].report.commit = ka[2].stage_commit(
            SESSION,
            2,
            2,
            p[2].report.commit.input_hash,
            p[2].report.commit.output_hash,
        );
        assert_eq!(proven(p), Some(2));
        // A signature by someone else.
        let mut p = good.clone();
        p[2].report.commit = Identity::from_seed([99; 32]).stage_commit(
            SESSION,
            3,
            2,
            p[2].report.commit.input_hash,
            p[2].report.commit.output_hash,
        );
        assert_eq!(proven(p), Some(2));
        // Stage 0 sent one output and reported another: its own two signatures convict it.
        let mut p = good.clone();
        p[0].report.commit = ka[0].stage_commit(SESSION, 3, 0, input, sha256(b"other"));
        assert_eq!(proven(p), Some(0));
        // A first stage claiming another input than the coordinator gave it.
        let mut p = good.clone();
        p[0].report.commit =
            ka[0].stage_commit(SESSION, 3, 0, sha256(b"?"), p[0].report.commit.output_hash);
        p[1].report.received = Some(p[0].report.commit.clone());
        assert_eq!(proven(p), Some(0));
        // A middle stage that answers a token.
        let mut p = good.clone();
        p[1].report.token = Some(1);
        assert_eq!(proven(p), Some(1));
        assert_eq!(proven(good), None);
    }

    #[test]
    fn same_logits_and_different_tokens_go_to_the_last_stage() {
        let input = sha256(b"prompt");
        let a = pipeline(&keys(1), 0, input, 42);
        let b = pipeline(&keys(10), 0, input, 43);
        assert_eq!(
            judge(&SESSION, 0, &[input, input], &[a, b]),
            StepVerdict::Diverged { stage: 2 }
        );
    }
}
