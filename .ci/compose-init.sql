-- docker-compose.yaml: the demo source systems, the audit store and the statistics store beside Airflow's own database
-- (which also holds Celery's task results). tests/test_celery_deployment.py runs this file as is.
CREATE DATABASE crm;
CREATE DATABASE accounting;
CREATE DATABASE marketing;
CREATE DATABASE retention_audit;
CREATE DATABASE retention_statistics;
-- The CRM data map's archive_reader_role: `rules check` (the DAG's check_rules) refuses a missing one.
CREATE ROLE legal_archive_reader;
