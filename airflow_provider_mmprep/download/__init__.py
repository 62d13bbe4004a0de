"""The image downloader behind the download_images stage, split the way img2dataset is: options, reader,
fetcher, resizer and shard writer. Nothing here imports Airflow."""
