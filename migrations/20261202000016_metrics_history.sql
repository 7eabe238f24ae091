-- Metrics history (the console's curves, GET /api/v1/training_runs/{id}/metrics): one row
-- per forward_backward or optim_step result of a training run, its metrics as a JSON object
-- of names to numbers (jobs::history::MetricPoint). `step` is the run's optimizer step count
-- (for forward_backward, the steps before it). Bounded per run: past
-- LORAPLEX_MAX_METRIC_POINTS the oldest rows go. Deleted with the run.
CREATE TABLE run_metrics (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id  TEXT NOT NULL,
    model_id   TEXT NOT NULL,
    step       INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('forward_backward', 'optim_step')),
    metrics    TEXT NOT NULL,
    time_ms    INTEGER NOT NULL
);
CREATE INDEX run_metrics_run ON run_metrics (tenant_id, model_id, step, id);
-- Pruning walks a run's rows newest first.
CREATE INDEX run_metrics_newest ON run_metrics (tenant_id, model_id, id);
