-- Finished futures nobody fetched expire a while after they finished: the sweep finds
-- them by finish time.
CREATE INDEX futures_unread ON futures (finished_ms) WHERE fetched_ms IS NULL AND finished_ms IS NOT NULL;
