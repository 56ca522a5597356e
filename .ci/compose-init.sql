-- docker-compose.yaml: the demo source systems, the audit store and the statistics store beside Airflow's own database
-- (which also holds Celery's task results). tests/test_celery_deployment.py runs this file as is.
CREATE DATABASE crm;
CREATE DATABASE accounting;
CREATE DATABASE marketing;
-- The audit store's text is hashes and ids, whose order means nothing: compared byte by byte (C) its three indexes
-- cost less to keep than under the image's en_US.utf8 (1.5 million entries: 13 % less than under ICU's en-US).
CREATE DATABASE retention_audit TEMPLATE template0 LOCALE 'C';
CREATE DATABASE retention_statistics;
-- The CRM data map's archive_reader_role: `rules check` (the DAG's check_rules) refuses a missing one.
CREATE ROLE legal_archive_reader;
