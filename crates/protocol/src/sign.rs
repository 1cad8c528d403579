//! The signed statements. Each message starts with its own domain tag, so a signature made for
//! one purpose (a login) can never be replayed as another (a result), and each binds the
//! signer's key, so one worker's signed result is worthless under another worker's name.

use curve25519_dalek::{
    constants::ED25519_BASEPOINT_POINT,
    edwards::{CompressedEdwardsY, EdwardsPoint},
    scalar::Scalar,
    traits::{IsIdentity, VartimeMultiscalarMul},
};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha512};

use crate::{
    Address, Bytes, Hash, LeaseId, ProtocolError, PublicKey, Receipt, SessionId, Signature,
    StageCommit, Submission,
};

/// An ed25519 key pair: a worker's identity or the coordinator's receipt key.
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// From 32 secret bytes (drawn from the OS by the caller and kept in its state dir).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        Bytes(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Bytes(self.key.sign(message).to_bytes())
    }

    /// The answer to a login challenge.
    pub fn sign_login(&self, nonce: &Bytes<32>, coordinator: &PublicKey) -> Signature {
        self.sign(&login_message(nonce, coordinator, &self.public()))
    }

    /// A signed result for `lease` of unit `unit`.
    pub fn submission(&self, lease: LeaseId, unit: Hash, output: Vec<u8>) -> Submission {
        let output_hash = crate::sha256(&output);
        let signature = self.sign(&result_message(&unit, &lease, &output_hash, &self.public()));
        Submission {
            lease,
            unit,
            output_hash,
            output,
            signature,
        }
    }

    /// Commits to one step of a pipeline stage.
    pub fn stage_commit(
        &self,
        session: SessionId,
        step: u32,
        stage: u16,
        input_hash: Hash,
        output_hash: Hash,
    ) -> StageCommit {
        let signature = self.sign(&stage_message(
            &session,
            step,
            stage,
            &input_hash,
            &output_hash,
            &self.public(),
        ));
        StageCommit {
            session,
            step,
            stage,
            input_hash,
            output_hash,
            signature,
        }
    }

    pub fn sign_payout(&self, address: &Address) -> Signature {
        self.sign(&payout_message(address, &self.public()))
    }

    /// Signs `receipt` (its `coordinator` field must be this identity's key).
    pub fn sign_receipt(&self, receipt: &mut Receipt) {
        receipt.coordinator = self.public();
        receipt.signature = self.sign(&receipt_message(receipt));
    }
}

fn tagged(tag: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut out = tag.to_vec();
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

pub fn login_message(nonce: &Bytes<32>, coordinator: &PublicKey, worker: &PublicKey) -> Vec<u8> {
    tagged(b"tabula/login/v1", &[&nonce.0, &coordinator.0, &worker.0])
}

pub fn result_message(
    unit: &Hash,
    lease: &LeaseId,
    output_hash: &Hash,
    worker: &PublicKey,
) -> Vec<u8> {
    tagged(
        b"tabula/result/v1",
        &[&unit.0, &lease.0, &output_hash.0, &worker.0],
    )
}

pub fn stage_message(
    session: &SessionId,
    step: u32,
    stage: u16,
    input_hash: &Hash,
    output_hash: &Hash,
    worker: &PublicKey,
) -> Vec<u8> {
    tagged(
        b"tabula/stage/v1",
        &[
            &session.0,
            &step.to_le_bytes(),
            &stage.to_le_bytes(),
            &input_hash.0,
            &output_hash.0,
            &worker.0,
        ],
    )
}

pub fn payout_message(address: &Address, worker: &PublicKey) -> Vec<u8> {
    tagged(b"tabula/payout/v1", &[&address.0, &worker.0])
}

/// The bytes a receipt's signature covers (every field but the signature).
pub fn receipt_message(r: &Receipt) -> Vec<u8> {
    tagged(
        b"tabula/receipt/v1",
        &[
            &r.coordinator.0,
            &r.worker.0,
            &r.unit.0,
            &r.lease.0,
            &r.output_hash.0,
            &r.credit_micro.to_le_bytes(),
            &r.issued_ms.to_le_bytes(),
        ],
    )
}

/// Checks `signature` of `message` under `key` (strict verification: no malleable encodings).
pub fn verify(key: &PublicKey, message: &[u8], signature: &Signature) -> Result<(), ProtocolError> {
    SignerKey::parse(key)?.verify(message, signature)
}

/// A public key decompressed once, to check many signatures by the same signer: the
/// coordinator checks every result of a session under its worker's key, and decompressing
/// the key (a square root in the field) was a fifth of each check.
#[derive(Clone, Copy, Debug)]
pub struct SignerKey {
    public: PublicKey,
    key: VerifyingKey,
    /// −A, the key's point negated, for the result equation.
    minus_point: EdwardsPoint,
}

impl SignerKey {
    /// Refuses keys that do not decode to a point and weak keys (of small order: under one,
    /// anybody could sign anything).
    pub fn parse(public: &PublicKey) -> Result<Self, ProtocolError> {
        let key = VerifyingKey::from_bytes(&public.0).map_err(|_| ProtocolError::BadKey)?;
        if key.is_weak() {
            return Err(ProtocolError::BadKey);
        }
        Ok(Self {
            public: *public,
            key,
            minus_point: -key.to_edwards(),
        })
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Checks `signature` of `message` (strict verification: no malleable encodings).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), ProtocolError> {
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.key
            .verify_strict(message, &signature)
            .map_err(|_| ProtocolError::BadSignature)
    }
}

/// A result signature taken apart for the equation `[8]([s]B − R − [k]A) = 0`.
struct ResultEquation {
    r_bytes: [u8; 32],
    r: EdwardsPoint,
    s: Scalar,
    /// H(R ‖ A ‖ statement), reduced.
    k: Scalar,
}

impl SignerKey {
    /// Checks that each result's output hashes to its `output_hash` and that this worker signed
    /// the statement, for a run of results of one worker at once; the verdicts are in the
    /// order of `results`.
    ///
    /// Result signatures are checked by the cofactored equation, under the rules of
    /// [ZIP 215](https://zips.z.cash/zip-0215) (`s` canonical, `R` any encoding of a point,
    /// `[8]([s]B − R − [k]A) = 0`) instead of the strict cofactorless one the other statements
    /// use, because it is the only ed25519 equation whose batch check agrees with checking
    /// each signature alone: with the cofactorless one, a signer could put a small-order
    /// component into `R` that a random linear combination cancels one time in eight, so
    /// whether a result passed would depend on which others it was checked with. Under
    /// either equation only the key's holder can sign; they differ only on signatures a signer
    /// deliberately malforms. A run passes or fails with one multi-scalar multiplication
    /// (about half the cost per result of checking them one by one when eight arrive together);
    /// when it fails, each result is checked alone so that only the bad ones are refused.
    pub fn verify_results(&self, results: &[Submission]) -> Vec<Result<(), ProtocolError>> {
        let equations: Vec<Result<ResultEquation, ProtocolError>> =
            results.iter().map(|s| self.result_equation(s)).collect();
        let sound: Vec<&ResultEquation> = equations.iter().flatten().collect();
        if sound.len() >= 2 && self.batch_holds(&sound) {
            return equations.into_iter().map(|e| e.map(|_| ())).collect();
        }
        equations
            .into_iter()
            .map(|e| {
                let e = e?;
                let sum = EdwardsPoint::vartime_double_scalar_mul_basepoint(
                    &e.k,
                    &self.minus_point,
                    &e.s,
                ) - e.r;
                if sum.mul_by_cofactor().is_identity() {
                    Ok(())
                } else {
                    Err(ProtocolError::BadSignature)
                }
            })
            .collect()
    }

    /// The parts of `s`'s signature, or why it cannot hold.
    fn result_equation(&self, s: &Submission) -> Result<ResultEquation, ProtocolError> {
        if crate::sha256(&s.output) != s.output_hash {
            return Err(ProtocolError::Malformed(
                "output does not hash to output_hash".into(),
            ));
        }
        let (r_bytes, s_bytes) = s.signature.0.split_at(32);
        let r_bytes: [u8; 32] = r_bytes.try_into().expect("half of 64 bytes");
        let s_bytes: [u8; 32] = s_bytes.try_into().expect("half of 64 bytes");
        let r = CompressedEdwardsY(r_bytes)
            .decompress()
            .ok_or(ProtocolError::BadSignature)?;
        let scalar = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes))
            .ok_or(ProtocolError::BadSignature)?;
        let mut h = Sha512::new();
        h.update(r_bytes);
        h.update(self.public.0);
        h.update(result_message(
            &s.unit,
            &s.lease,
            &s.output_hash,
            &self.public,
        ));
        Ok(ResultEquation {
            r_bytes,
            r,
            s: scalar,
            k: Scalar::from_bytes_mod_order_wide(&h.finalize().into()),
        })
    }

    /// Whether `[8]([Σzᵢsᵢ]B − Σ[zᵢ]Rᵢ − [Σzᵢkᵢ]A) = 0` for 128-bit weights `zᵢ` drawn by
    /// hashing every equation (so a signer cannot pick signatures that cancel out). Every
    /// signature is by the same key, so `A` appears once.
    fn batch_holds(&self, equations: &[&ResultEquation]) -> bool {
        let mut transcript = Sha512::new();
        transcript.update(b"tabula/result-batch/v1");
        for e in equations {
            transcript.update(e.r_bytes);
            transcript.update(e.s.as_bytes());
            transcript.update(e.k.as_bytes());
        }
        let seed = transcript.finalize();
        let weights: Vec<Scalar> = (0..equations.len() as u64)
            .map(|i| {
                let z: [u8; 64] = Sha512::new()
                    .chain_update(seed)
                    .chain_update(i.to_le_bytes())
                    .finalize()
                    .into();
                Scalar::from(u128::from_le_bytes(z[..16].try_into().expect("16 bytes")))
            })
            .collect();
        let base: Scalar = equations.iter().zip(&weights).map(|(e, z)| z * e.s).sum();
        let key: Scalar = equations.iter().zip(&weights).map(|(e, z)| z * e.k).sum();
        let sum = EdwardsPoint::vartime_multiscalar_mul(
            [base, key].into_iter().chain(weights.iter().map(|z| -z)),
            [ED25519_BASEPOINT_POINT, self.minus_point]
                .into_iter()
                .chain(equations.iter().map(|e| e.r)),
        );
        sum.mul_by_cofactor().is_identity()
    }
}

impl Submission {
    /// Checks that the output hashes to `output_hash` and that `worker` signed the statement
    /// ([`SignerKey::verify_results`] for one result).
    pub fn verify(&self, worker: &SignerKey) -> Result<(), ProtocolError> {
        worker
            .verify_results(std::slice::from_ref(self))
            .pop()
            .expect("one verdict per result")
    }
}

impl StageCommit {
    /// Checks that `worker` signed this commitment.
    pub fn verify(&self, worker: &SignerKey) -> Result<(), ProtocolError> {
        worker.verify(
            &stage_message(
                &self.session,
                self.step,
                self.stage,
                &self.input_hash,
                &self.output_hash,
                worker.public(),
            ),
            &self.signature,
        )
    }
}

impl Receipt {
    pub fn verify(&self) -> Result<(), ProtocolError> {
        verify(&self.coordinator, &receipt_message(self), &self.signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MAX_WORKER_FRAME, PROTOCOL_VERSION, ToCoordinator, ToWorker, decode, encode};

    fn identity(n: u8) -> Identity {
        Identity::from_seed([n; 32])
    }

    #[test]
    fn activations_are_checked_against_their_senders_commitment() {
        use crate::{Activation, sha256};
        let (a, b) = (identity(1), identity(2));
        let ka = SignerKey::parse(&a.public()).unwrap();
        let session = Bytes([9; 16]);
        let data: Vec<u8> = (0..2 * 8 * 4).map(|i| i as u8).collect();
        let good = Activation {
            commit: a.stage_commit(session, 3, 1, sha256(b"in"), sha256(&data)),
            rows: 2,
            data: data.clone(),
        };
        good.check(&ka, &session, 3, 1, 8).unwrap();

        let mut flipped = good.clone();
        flipped.data[5] ^= 1;
        let mut replayed = good.clone();
        replayed.commit = b.stage_commit(session, 3, 1, sha256(b"in"), sha256(&data));
        let mut wrong_input = good.clone();
        wrong_input.commit.input_hash = sha256(b"other");
        let mut short = good.clone();
        short.data.pop();
        let mut rows = good.clone();
        rows.rows = 3;
        let cases = [
            ("a flipped byte", flipped, 3, 1),
            ("another key's commitment", replayed, 3, 1),
            ("an input hash it did not sign", wrong_input, 3, 1),
            ("a short message", short, 3, 1),
            ("the wrong row count", rows, 3, 1),
            ("another step", good.clone(), 4, 1),
            ("another stage", good.clone(), 3, 2),
        ];
        for (what, act, step, stage) in cases {
            assert!(
                act.check(&ka, &session, step, stage, 8).is_err(),
                "{what} accepted"
            );
        }
        assert!(good.check(&ka, &Bytes([8; 16]), 3, 1, 8).is_err());
        // A commitment signed for a stage does not verify as a result or a login.
        let stage = stage_message(&session, 3, 1, &sha256(b"in"), &sha256(&data), &a.public());
        assert!(stage.starts_with(b"tabula/stage/v1"));
    }

    fn signer(i: &Identity) -> SignerKey {
        SignerKey::parse(&i.public()).unwrap()
    }

    #[test]
    fn results_verify_only_under_their_signer() {
        let alice = identity(1);
        let bob = identity(2);
        let s = alice.submission(Bytes([7; 16]), Bytes([9; 32]), vec![1, 2, 3]);
        s.verify(&signer(&alice)).unwrap();
        assert_eq!(s.verify(&signer(&bob)), Err(ProtocolError::BadSignature));
        let mut tampered = s.clone();
        tampered.output = vec![1, 2, 4];
        assert!(matches!(
            tampered.verify(&signer(&alice)),
            Err(ProtocolError::Malformed(_))
        ));
        let mut other_lease = s.clone();
        other_lease.lease = Bytes([8; 16]);
        assert_eq!(
            other_lease.verify(&signer(&alice)),
            Err(ProtocolError::BadSignature)
        );
    }

    #[test]
    fn a_run_of_results_is_checked_together_and_only_bad_ones_fail() {
        let alice = identity(1);
        let key = signer(&alice);
        let results: Vec<Submission> = (0..6u8)
            .map(|i| alice.submission(Bytes([i; 16]), Bytes([9; 32]), vec![i; 40]))
            .collect();
        assert!(key.verify_results(&results).iter().all(Result::is_ok));
        let mut mixed = results.clone();
        // Another result's signature, a forged one, an output that is not the hashed one.
        mixed[1].signature = results[2].signature;
        mixed[3].signature = Bytes([7; 64]);
        mixed[4].output.push(0);
        let verdicts = key.verify_results(&mixed);
        assert_eq!(verdicts[0], Ok(()));
        assert_eq!(verdicts[1], Err(ProtocolError::BadSignature));
        assert_eq!(verdicts[2], Ok(()));
        assert_eq!(verdicts[3], Err(ProtocolError::BadSignature));
        assert!(matches!(verdicts[4], Err(ProtocolError::Malformed(_))));
        assert_eq!(verdicts[5], Ok(()));
        // Bob's results are not Alice's, together or alone.
        let bob = signer(&identity(2));
        assert!(bob.verify_results(&results).iter().all(Result::is_err));
        assert!(key.verify_results(&[]).is_empty());
    }

    /// A signature whose `R` carries a small-order component: only the key's holder can make
    /// one, the cofactored equation accepts it and the strict one does not. Results are
    /// checked by the cofactored one whether alone or with others, so a verdict never depends
    /// on the company a result arrived in.
    #[test]
    fn results_are_checked_by_the_cofactored_equation_alone_or_together() {
        use curve25519_dalek::constants::EIGHT_TORSION;
        let alice = identity(1);
        let key = signer(&alice);
        let secret = SigningKey::from_bytes(&alice.seed()).to_scalar();
        let (lease, unit, output) = (Bytes([3; 16]), Bytes([4; 32]), vec![5u8; 64]);
        let output_hash = crate::sha256(&output);
        let nonce = Scalar::from(123_456_789u64);
        let r = (ED25519_BASEPOINT_POINT * nonce + EIGHT_TORSION[1]).compress();
        let message = result_message(&unit, &lease, &output_hash, &alice.public());
        let k = Scalar::from_bytes_mod_order_wide(
            &Sha512::new()
                .chain_update(r.as_bytes())
                .chain_update(alice.public().0)
                .chain_update(&message)
                .finalize()
                .into(),
        );
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(r.as_bytes());
        signature[32..].copy_from_slice((nonce + k * secret).as_bytes());
        let odd = Submission {
            lease,
            unit,
            output_hash,
            output,
            signature: Bytes(signature),
        };
        assert_eq!(
            key.verify(&message, &odd.signature),
            Err(ProtocolError::BadSignature),
            "the strict equation refuses it"
        );
        assert_eq!(odd.verify(&key), Ok(()));
        let honest: Vec<Submission> = (0..4u8)
            .map(|i| alice.submission(Bytes([i; 16]), Bytes([9; 32]), vec![i; 8]))
            .collect();
        for at in 0..=honest.len() {
            let mut run = honest.clone();
            run.insert(at, odd.clone());
            assert!(key.verify_results(&run).iter().all(Result::is_ok));
        }
        // A non-canonical `s` (s + ℓ) is refused even though it satisfies the equation.
        let mut high = odd.clone();
        let mut s_plus_l = [0u8; 32];
        // ℓ = 2^252 + 27742317777372353535851937790883648493, little-endian.
        let mut l = [0u8; 32];
        l[..16].copy_from_slice(&[
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14,
        ]);
        l[31] = 0x10;
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = u16::from(signature[32 + i]) + u16::from(l[i]) + carry;
            s_plus_l[i] = sum as u8;
            carry = sum >> 8;
        }
        high.signature.0[32..].copy_from_slice(&s_plus_l);
        assert_eq!(high.verify(&key), Err(ProtocolError::BadSignature));
    }

    #[test]
    fn weak_keys_are_refused() {
        // The identity point, of order one: every signature would verify under it.
        let mut identity_point = [0u8; 32];
        identity_point[0] = 1;
        assert!(matches!(
            SignerKey::parse(&Bytes(identity_point)),
            Err(ProtocolError::BadKey)
        ));
    }

    #[test]
    fn a_login_signature_is_not_a_payout_signature() {
        let w = identity(3);
        let sig = w.sign_login(&Bytes([1; 32]), &identity(4).public());
        let address = Bytes([1; 20]);
        assert!(verify(&w.public(), &payout_message(&address, &w.public()), &sig).is_err());
        verify(
            &w.public(),
            &payout_message(&address, &w.public()),
            &w.sign_payout(&address),
        )
        .unwrap();
    }

    #[test]
    fn receipts_verify_and_detect_edits() {
        let c = identity(5);
        let mut r = Receipt {
            coordinator: Bytes::default(),
            worker: identity(6).public(),
            unit: Bytes([1; 32]),
            lease: Bytes([2; 16]),
            output_hash: Bytes([3; 32]),
            credit_micro: 1_500_000,
            issued_ms: 42,
            signature: Bytes([0; 64]),
        };
        c.sign_receipt(&mut r);
        r.verify().unwrap();
        r.credit_micro += 1;
        assert_eq!(r.verify(), Err(ProtocolError::BadSignature));
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_errors() {
        let w = identity(7);
        let msg = ToCoordinator::Submit(w.submission(Bytes([1; 16]), Bytes([2; 32]), vec![5; 100]));
        let frame = encode(&msg);
        assert_eq!(
            decode::<ToCoordinator>(&frame, MAX_WORKER_FRAME).unwrap(),
            msg
        );
        assert!(matches!(
            decode::<ToCoordinator>(&frame, 10),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut other_version = frame.clone();
        other_version[0] = PROTOCOL_VERSION as u8 + 1;
        assert!(matches!(
            decode::<ToCoordinator>(&other_version, MAX_WORKER_FRAME),
            Err(ProtocolError::Version { .. })
        ));
        assert_eq!(
            decode::<ToCoordinator>(&[1], MAX_WORKER_FRAME),
            Err(ProtocolError::Truncated)
        );
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(decode::<ToCoordinator>(&trailing, MAX_WORKER_FRAME).is_err());
        // Every truncation and every single-byte corruption decodes to an error or to some
        // message, never a panic.
        for cut in 0..frame.len() {
            let _ = decode::<ToCoordinator>(&frame[..cut], MAX_WORKER_FRAME);
        }
        for i in 0..frame.len().min(64) {
            for b in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut f = frame.clone();
                f[i] = b;
                let _ = decode::<ToCoordinator>(&f, MAX_WORKER_FRAME);
                let _ = decode::<ToWorker>(&f, MAX_WORKER_FRAME);
            }
        }
    }

    #[test]
    fn a_huge_claimed_length_does_not_allocate_it() {
        // A Submit whose output claims 2^62 bytes in a 20-byte frame.
        let mut frame = PROTOCOL_VERSION.to_le_bytes().to_vec();
        frame.push(3); // variant Submit
        frame.extend([0u8; 16 + 32 + 32]);
        frame.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f]);
        assert!(decode::<ToCoordinator>(&frame, MAX_WORKER_FRAME).is_err());
    }

    #[test]
    fn hex_round_trips_and_rejects_bad_lengths() {
        let h = crate::sha256(b"abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Hash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(Hash::from_hex("abcd").is_err());
        assert!(Address::from_hex("0x00000000000000000000000000000000000000zz").is_err());
    }
}
