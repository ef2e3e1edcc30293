//! Pipelines through the API: created and deleted on the worker, checked against the catalog.

use std::sync::Arc;

use super::Worker;
use crate::error::ApiError;
use crate::functions::catalog::{FunctionMap, PipelineMap};
use crate::functions::record::{new_id, resolve, Source};
use crate::functions::{PipelineRecord, PipelineSpec};

impl Worker {
    pub(super) fn create_pipeline(&self, body: &[u8], tenant: u64) -> Result<PipelineRecord, ApiError> {
        let spec: PipelineSpec = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                ApiError::InvalidPipeline(format!("invalid pipeline: {e}"))
            } else {
                ApiError::InvalidJson(e.to_string())
            }
        })?;
        let Some(name) = spec.name.clone() else {
            return Err(ApiError::InvalidPipeline("`name` is required".into()));
        };
        if spec.tenant.is_some() {
            return Err(ApiError::InvalidPipeline(
                "`tenant` is not part of the body; the request's tenant header sets it".into(),
            ));
        }
        let pipelines = self.catalog.pipelines().load().1;
        if pipelines.values().any(|p| p.source == Source::Directory && p.tenant_id == tenant && p.name == name) {
            return Err(ApiError::ManagedByDirectory { what: "pipeline", name });
        }
        let record = spec.into_record(new_id(), name, tenant, self.next_created_ms(), Source::Api, &self.limits)?;
        check_steps(&self.catalog.current(), &record).map_err(ApiError::InvalidPipeline)?;
        // The fleet's copy first, as for a function: refused there, nothing changed anywhere.
        if let Some(registry) = &self.registry {
            let revision = registry.publish_pipeline(&record)?;
            self.published_at(&record.id, revision);
        }
        self.keep_pipeline(record.clone())?;
        Ok(record)
    }

    pub(super) fn delete_pipeline(&self, id: &str, tenant: u64) -> Result<(), ApiError> {
        let pipelines = self.catalog.pipelines().load().1;
        let Some(pipeline) = pipelines.get(id).filter(|p| p.tenant_id == tenant) else {
            return Err(ApiError::PipelineNotFound(id.to_string()));
        };
        if pipeline.source == Source::Directory {
            return Err(ApiError::ManagedByDirectory { what: "pipeline", name: pipeline.name.clone() });
        }
        if let Some(registry) = &self.registry {
            registry.remove_pipeline(id)?;
        }
        self.forget_pipeline(id)
    }

    /// Removes an API pipeline from the store and the catalog.
    pub(super) fn forget_pipeline(&self, id: &str) -> Result<(), ApiError> {
        self.store.remove_pipeline(id).map_err(|e| ApiError::Storage(e.to_string()))?;
        let mut map = PipelineMap::clone(&self.catalog.pipelines().load().1);
        map.remove(id);
        self.catalog.publish_pipelines(map);
        Ok(())
    }

    /// Stores an API pipeline and publishes it in the catalog, replacing one of the same id.
    pub(super) fn keep_pipeline(&self, record: PipelineRecord) -> Result<(), ApiError> {
        self.store.write_pipeline(&record).map_err(|e| ApiError::Storage(e.to_string()))?;
        let mut map = PipelineMap::clone(&self.catalog.pipelines().load().1);
        map.insert(record.id.clone(), Arc::new(record));
        self.catalog.publish_pipelines(map);
        Ok(())
    }
}

/// Every step names a function of the pipeline's tenant that can run as a step (has `_start`).
pub(super) fn check_steps(functions: &FunctionMap, pipeline: &PipelineRecord) -> Result<(), String> {
    for (index, step) in pipeline.steps.iter().enumerate() {
        let records = functions.values().map(|f| &f.record);
        let Some(record) = resolve(records, pipeline.tenant_id, &step.function) else {
            return Err(format!("step {index}: no function `{}` in this tenant", step.function));
        };
        let module = match &functions[&record.id].module {
            Ok(module) => module,
            Err(reason) => return Err(format!("step {index}: function `{}` is broken: {reason}", step.function)),
        };
        if module.get_export("_start").is_none() {
            return Err(format!("step {index}: function `{}` has no `_start`, so it cannot be a step", step.function));
        }
    }
    Ok(())
}

pub(super) fn same_pipeline(a: &PipelineRecord, b: &PipelineRecord) -> bool {
    PipelineRecord { created_unix_ms: b.created_unix_ms, ..a.clone() } == *b
}
