"""An S3-compatible store for the tests and the benchmarks: moto's standalone server (what s3fs's own tests use) in
its own process, with IAM authentication on, so that a wrong secret is refused as a real store would refuse it.

    store = S3Store.start(tmp_path)        # a user with S3 rights, a bucket `lepton`
    store.environ()                        # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, region
    store.revoke()                         # the key deleted: refused from then on
    store.stop()                           # an outage
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.tools.airflow_env import free_port

MOTO_SERVER = str(REPO_ROOT / ".venv" / "bin" / "moto_server")
BUCKET = "lepton"
REGION = "us-east-1"
# S3, and the user's own keys (as AWS's self-service credentials policy allows): `revoke` deletes the key in use
S3_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
    {"Effect": "Allow", "Action": ["iam:DeleteAccessKey"], "Resource": "*"}]}


@dataclass
class S3Store:
    endpoint: str
    key_id: str
    secret: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, folder: Path, host: str = "127.0.0.1", launch: tuple[str, ...] = ()) -> S3Store:
        """`launch`: what the server's command runs under (another host's `ip netns exec NAME`)."""
        port = free_port()
        log = Path(folder) / "moto.log"
        # the first three calls (a user, its key, its policy) need no signature; every later one does
        process = _serve(host, port, log, launch)
        store = cls(f"http://{host}:{port}", "", "", process, log)
        iam = store.client("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="lepton")
        key = iam.create_access_key(UserName="lepton")["AccessKey"]
        iam.put_user_policy(UserName="lepton", PolicyName="s3", PolicyDocument=json.dumps(S3_POLICY))
        store.key_id, store.secret = key["AccessKeyId"], key["SecretAccessKey"]
        store.client("s3").create_bucket(Bucket=BUCKET)
        return store

    def client(self, service: str, key_id: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret)

    def environ(self) -> dict[str, str]:
        """What a process needs to reach the store: the standard AWS settings, nothing of Lepton's."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": REGION}

    def upload(self, local: Path, key: str) -> str:
        self.client("s3").upload_file(str(local), BUCKET, key)
        return f"s3://{BUCKET}/{key}"

    def revoke(self) -> None:
        """Delete the access key in use (an operator rotating credentials): every process holding it is refused."""
        self.client("iam").delete_access_key(UserName="lepton", AccessKeyId=self.key_id)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _serve(host: str, port: int, log: Path, launch: tuple[str, ...] = ()) -> subprocess.Popen:
    with log.open("a") as out:
        process = subprocess.Popen([*launch, MOTO_SERVER, "-H", host, "-p", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT,
                                   env={"INITIAL_NO_AUTH_ACTION_COUNT": "3", "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{host}:{port}/moto-api/", timeout=2)  # noqa: S310 (a local test server)
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited {process.returncode}: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"moto_server did not answer on {host}:{port} in 60 s")
