//! The worker's side of its queue: the jobs shards send, and the handle they send them through.

use futures_channel::oneshot;
use wasmtime::Module;

use super::deploys::{DeployReply, DeployRequest, PendingDeploy};
use crate::error::ApiError;
use crate::functions::queue;
use crate::functions::FunctionRecord;
use crate::functions::PipelineRecord;

pub(super) enum Job {
    Deploy(DeployRequest, DeployReply),
    /// A deploy's module, back from the compile thread.
    Compiled(Box<PendingDeploy>, Result<Module, ApiError>),
    Delete {
        id: String,
        tenant: u64,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    CreatePipeline {
        body: Vec<u8>,
        tenant: u64,
        reply: oneshot::Sender<Result<PipelineRecord, ApiError>>,
    },
    DeletePipeline {
        id: String,
        tenant: u64,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// The registry's client has changes waiting (`registry_sync`).
    RegistryChanges,
}

/// A shard's handle to the worker. Submitting never blocks: a full queue is 503 `overloaded`, a
/// tenant's full share of it 429 `admin_queue_limited`.
#[derive(Clone)]
pub struct AdminHandle {
    pub(super) tx: queue::Sender<Job>,
    pub(super) per_tenant: usize,
}

impl AdminHandle {
    pub async fn deploy(&self, req: DeployRequest) -> Result<FunctionRecord, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(req.tenant_id, false, Job::Deploy(req, tx))?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// Deletes `id` if `tenant` owns it; another tenant's function is "not found". Never waits
    /// behind a compile.
    pub async fn delete(&self, id: String, tenant: u64) -> Result<(), ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(tenant, true, Job::Delete { id, tenant, reply: tx })?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// Creates a pipeline from a `POST /pipelines` body.
    pub async fn create_pipeline(&self, body: Vec<u8>, tenant: u64) -> Result<PipelineRecord, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(tenant, true, Job::CreatePipeline { body, tenant, reply: tx })?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// Deletes pipeline `id` if `tenant` owns it, as `delete`.
    pub async fn delete_pipeline(&self, id: String, tenant: u64) -> Result<(), ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(tenant, true, Job::DeletePipeline { id, tenant, reply: tx })?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// `urgent`: a cheap job, served before any deploy and while a compile runs.
    fn submit(&self, tenant: u64, urgent: bool, job: Job) -> Result<(), ApiError> {
        self.tx.push(tenant, urgent, job).map_err(|e| match e {
            queue::Refused::Full => ApiError::Overloaded("the deploy queue is full"),
            queue::Refused::TenantFull => ApiError::AdminQueueLimited { limit: self.per_tenant },
            queue::Refused::Closed => ApiError::Internal("the catalog worker stopped".into()),
        })
    }
}
