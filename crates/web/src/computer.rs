//! A compute worker of the browser volunteer's pool: the executor alone, without a key, a
//! socket or a session. `www/compute.js` runs one per thread the volunteer's throttle allows;
//! the session's worker (`Volunteer`, which holds the key and the one session) hands each a
//! unit's task (`Volunteer::taskFrame`) and signs what it returns (`Volunteer::submitFrame`).
//! The executor is the native worker's, on the wasm CPU path, so the bytes are the same as a
//! unit computed in the session's own worker.

use std::{cell::RefCell, collections::HashMap};

use tabula_engine::cpu::CpuBackend;
use tabula_protocol::{MAX_COORDINATOR_FRAME, Task, decode};
use tabula_worker::Executor;
use wasm_bindgen::prelude::*;

use crate::{
    js_err,
    volunteer::{FileOut, Supplied},
};

/// One compute worker's executor (the models it loaded stay loaded between units).
#[wasm_bindgen]
pub struct Computer {
    /// Taken out while a unit computes: one unit at a time per compute worker.
    executor: RefCell<Option<Executor<CpuBackend>>>,
}

impl Default for Computer {
    fn default() -> Self {
        Self::new()
    }
}

#[wasm_bindgen]
impl Computer {
    #[wasm_bindgen(constructor)]
    pub fn new() -> Computer {
        Computer {
            executor: RefCell::new(Some(Executor::new(CpuBackend))),
        }
    }

    /// The files of `task`'s model this executor has not loaded yet, as
    /// `[{role, sha256, size}]`: fetch them, then call `run`.
    #[wasm_bindgen(js_name = neededFiles)]
    pub fn needed_files(&self, task: &[u8]) -> Result<JsValue, JsError> {
        let task = decode_task(task)?;
        let files: Vec<FileOut> = self
            .executor
            .borrow()
            .as_ref()
            .ok_or_else(|| JsError::new("a unit is already computing"))?
            .needed_files(&task)
            .into_iter()
            .map(FileOut::from)
            .collect();
        serde_wasm_bindgen::to_value(&files).map_err(js_err)
    }

    /// Computes `task` with `files` (the bytes of `neededFiles`' list, in that order; each
    /// hash is checked) and returns the encoded unit output.
    pub async fn run(
        &self,
        task: &[u8],
        files: Vec<js_sys::Uint8Array>,
    ) -> Result<Vec<u8>, JsError> {
        let task = decode_task(task)?;
        let mut executor = self
            .executor
            .borrow_mut()
            .take()
            .ok_or_else(|| JsError::new("a unit is already computing"))?;
        let needed = executor.needed_files(&task);
        let result = if files.len() != needed.len() {
            Err(JsError::new(&format!(
                "{} files supplied, {} needed",
                files.len(),
                needed.len()
            )))
        } else {
            let supplied = Supplied(RefCell::new(
                needed
                    .iter()
                    .zip(&files)
                    .map(|(f, bytes)| (f.sha256, bytes.to_vec()))
                    .collect::<HashMap<_, _>>(),
            ));
            executor
                .run_async(&task, &supplied)
                .await
                .map(|output| output.encode())
                .map_err(js_err)
        };
        *self.executor.borrow_mut() = Some(executor);
        result
    }
}

fn decode_task(bytes: &[u8]) -> Result<Task, JsError> {
    decode(bytes, MAX_COORDINATOR_FRAME).map_err(js_err)
}
