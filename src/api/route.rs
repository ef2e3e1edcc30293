/// The route templates, as the `route` label of every HTTP metric names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
    Functions,
    Function,
    Invoke,
    Unmatched,
}

impl Route {
    pub const ALL: [Route; 7] = [
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::Functions,
        Route::Function,
        Route::Invoke,
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
            Route::Unmatched => "unmatched",
        }
    }

    /// The `Allow` header of a 405 on this route.
    pub fn allow(self) -> &'static str {
        match self {
            Route::Healthz | Route::Readyz | Route::Metrics => "GET, HEAD",
            Route::Functions => "GET, HEAD, POST",
            Route::Function => "GET, HEAD, DELETE",
            Route::Invoke => "POST",
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
            _ => {}
        }
        let Some(rest) = trimmed.strip_prefix("/functions/") else {
            return (Route::Unmatched, "");
        };
        match rest.split_once('/') {
            None if !rest.is_empty() => (Route::Function, rest),
            Some((id, "invoke")) if !id.is_empty() => (Route::Invoke, id),
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
    }
}
