-- Current-state mirrors. Tables are created by the state sink from each envelope's columns:
-- cdc_processed.<source table>, with cdc_* metadata columns.
CREATE SCHEMA IF NOT EXISTS cdc_processed;
