//! The routes of the HTTP API, named by both `api` (which matches them) and `metrics` (which
//! labels by them).
//!
//! Boundary: a leaf; it imports nothing from the crate.

/// The route templates, as the `route` label of every HTTP metric names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
    Functions,
    Function,
    Invoke,
    Pipelines,
    Pipeline,
    PipelineInvoke,
    Unmatched,
}

impl Route {
    pub const ALL: [Route; 10] = [
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::Functions,
        Route::Function,
        Route::Invoke,
        Route::Pipelines,
        Route::Pipeline,
        Route::PipelineInvoke,
        Route::Unmatched,
    ];

    pub fn template(self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Functions => "/functions",
            Route::Function => "/functions/:id",
            Route::Invoke => "/functions/:id/invoke",
            Route::Pipelines => "/pipelines",
            Route::Pipeline => "/pipelines/:id",
            Route::PipelineInvoke => "/pipelines/:id/invoke",
            Route::Unmatched => "unmatched",
        }
    }

    /// The `Allow` header of a 405 on this route.
    pub fn allow(self) -> &'static str {
        match self {
            Route::Healthz | Route::Readyz | Route::Metrics => "GET, HEAD",
            Route::Functions | Route::Pipelines => "GET, HEAD, POST",
            Route::Function | Route::Pipeline => "GET, HEAD, DELETE",
            Route::Invoke | Route::PipelineInvoke => "POST",
            Route::Unmatched => "",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The route of `path`, and its `:id` segment where it has one.
    pub fn match_path(path: &str) -> (Route, &str) {
        let trimmed = path.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(path);
        match trimmed {
            "/healthz" => return (Route::Healthz, ""),
            "/readyz" => return (Route::Readyz, ""),
            "/metrics" => return (Route::Metrics, ""),
            "/functions" => return (Route::Functions, ""),
            "/pipelines" => return (Route::Pipelines, ""),
            _ => {}
        }
        let (rest, one, invoke) = if let Some(rest) = trimmed.strip_prefix("/functions/") {
            (rest, Route::Function, Route::Invoke)
        } else if let Some(rest) = trimmed.strip_prefix("/pipelines/") {
            (rest, Route::Pipeline, Route::PipelineInvoke)
        } else {
            return (Route::Unmatched, "");
        };
        match rest.split_once('/') {
            None if !rest.is_empty() => (one, rest),
            Some((id, "invoke")) if !id.is_empty() => (invoke, id),
            _ => (Route::Unmatched, ""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    #[test]
    fn matches_templates() {
        assert_eq!(Route::match_path("/healthz"), (Route::Healthz, ""));
        assert_eq!(Route::match_path("/functions/"), (Route::Functions, ""));
        assert_eq!(Route::match_path("/functions/abc"), (Route::Function, "abc"));
        assert_eq!(Route::match_path("/functions/abc/invoke"), (Route::Invoke, "abc"));
        assert_eq!(Route::match_path("/functions/abc/other").0, Route::Unmatched);
        assert_eq!(Route::match_path("/functions//invoke").0, Route::Unmatched);
        assert_eq!(Route::match_path("/").0, Route::Unmatched);
        assert_eq!(Route::match_path("/pipelines"), (Route::Pipelines, ""));
        assert_eq!(Route::match_path("/pipelines/p1"), (Route::Pipeline, "p1"));
        assert_eq!(Route::match_path("/pipelines/p1/invoke/"), (Route::PipelineInvoke, "p1"));
        assert_eq!(Route::match_path("/pipelines/p1/run").0, Route::Unmatched);
    }
}
