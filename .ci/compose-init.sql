-- docker-compose.yaml: the demo source systems and the audit store beside Airflow's own database.
CREATE DATABASE crm;
CREATE DATABASE accounting;
CREATE DATABASE marketing;
CREATE DATABASE retention_audit;
