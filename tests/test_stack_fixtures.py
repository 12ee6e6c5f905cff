"""The session's shared services start and answer: a real MLflow server and a real Ray cluster."""

import mlflow


def test_mlflow_server_records_a_run(mlflow_server):
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment("fixture-check") if not client.get_experiment_by_name("fixture-check") \
        else client.get_experiment_by_name("fixture-check").experiment_id
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "x", 1.5)
    assert client.get_run(run.info.run_id).data.metrics["x"] == 1.5


def test_ray_tasks_see_the_tracking_uri(ray_cluster, mlflow_server):
    @ray_cluster.remote
    def uri():
        import os

        return os.environ.get("MLFLOW_TRACKING_URI")

    assert ray_cluster.get(uri.remote()) == mlflow_server


def test_ray_workers_run_at_the_drivers_priority(ray_cluster):
    """Ray's default worker niceness (15) slows a 2-core machine's training; the stack sets 0."""
    import os

    @ray_cluster.remote
    def niceness():
        return os.nice(0)

    assert ray_cluster.get(niceness.remote()) == os.nice(0)
