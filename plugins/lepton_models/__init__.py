"""Model classes of the project's own, for pipelines that name one (`training.model: "lepton_models.MODULE:Class"`).

This folder is Airflow's plugins folder, on every Airflow process's path; Lepton puts it on its Dask workers'
path too. `plugins/.airflowignore` keeps Airflow's plugin loader from importing these modules (and torch) in
processes that never train.
"""
