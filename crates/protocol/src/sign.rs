//! The signed statements. Each message starts with its own domain tag, so a signature made for
//! one purpose (a login) can never be replayed as another (a result), and each binds the
//! signer's key, so one worker's signed result is worthless under another worker's name.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::{
    Address, Bytes, Hash, LeaseId, ProtocolError, PublicKey, Receipt, Signature, Submission,
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
}

impl SignerKey {
    pub fn parse(public: &PublicKey) -> Result<Self, ProtocolError> {
        let key = VerifyingKey::from_bytes(&public.0).map_err(|_| ProtocolError::BadKey)?;
        Ok(Self {
            public: *public,
            key,
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

impl Submission {
    /// Checks that the output hashes to `output_hash` and that `worker` signed the statement.
    pub fn verify(&self, worker: &SignerKey) -> Result<(), ProtocolError> {
        if crate::sha256(&self.output) != self.output_hash {
            return Err(ProtocolError::Malformed(
                "output does not hash to output_hash".into(),
            ));
        }
        worker.verify(
            &result_message(&self.unit, &self.lease, &self.output_hash, worker.public()),
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
