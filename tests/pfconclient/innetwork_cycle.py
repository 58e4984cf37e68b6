"""One in-network plugin job through a pfcon-compatible server, driven by
python-pfconclient exactly as CUBE drives a compute resource that shares its storage:
log in, read the server info, write inputs into the shared storeBase, run the copy job
(fslink) or see it skipped (filesystem), post the plugin job with storage paths, poll,
list the output dir as CUBE does before registering files, see the upload skipped, run
the delete job, and remove every job.

    python innetwork_cycle.py MODE URL USER PASSWORD IMAGE STOREBASE WORKDIR

MODE is fslink or filesystem; STOREBASE is the directory the server's storeBase is;
IMAGE carries /plugins/copy.sh. Prints what it found as one JSON line and exits non-zero
at the first thing that differs from pfcon.
"""

import json
import os
import sys
import time

from pfconclient import client
from pfconclient.client import JobType


def write(storebase, name, text):
    path = os.path.join(storebase, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main():
    mode, url, user, password, image, storebase, work = sys.argv[1:8]
    token = client.Client.get_auth_token(url + "auth-token/", user, password)
    cl = client.Client(url, token)
    cl.initial_wait = 0.5

    info = cl.get_server_info()
    assert info["storage_env"] == mode, info
    assert info["pfcon_innetwork"] is True, info
    assert cl.requires_copy_job is (mode == "fslink"), info
    assert cl.requires_upload_job is False, info

    jid = f"chris-jid-{mode}-1"
    uploads = "home/cube/uploads/study"
    out = f"home/cube/feeds/1/pl-copy_{mode}/data"
    write(storebase, f"{uploads}/scan.txt", "slice 1\n")
    write(storebase, f"{uploads}/meta/subject.json", '{"age": 7}\n')
    expected = ["meta/subject.json", "run.json", "scan.txt"]
    if mode == "fslink":
        # A ChRIS link to another folder of the user's, as CUBE writes them.
        write(storebase, "home/cube/PIPELINES/pipeline.yml", "steps: []\n")
        write(storebase, f"{uploads}/pipes.chrislink", "home/cube/PIPELINES")
        expected.append("home_cube_PIPELINES/pipeline.yml")

    copy = cl.submit_job(JobType.COPY, jid, {"input_dirs": [uploads], "output_dir": out})
    if mode == "fslink":
        status = cl.poll_job_status(JobType.COPY, jid)
        assert status == "finishedSuccessfully", cl.get_job_status(JobType.COPY, jid)
        assert os.path.exists(os.path.join(storebase, f"key-{jid}/incoming/scan.txt"))
    else:
        assert copy["compute"]["message"] == "copySkipped", copy

    descriptors = {
        "entrypoint": ["/bin/sh", "/plugins/copy.sh"],
        "args": [],
        "auid": "cube",
        "number_of_workers": 1,
        "cpu_limit": 1000,
        "memory_limit": 200,
        "gpu_limit": 0,
        "image": image,
        "type": "ds",
        "env": [],
        "input_dirs": [uploads],
        "output_dir": out,
    }
    posted = cl.submit_job(JobType.PLUGIN, jid, descriptors)
    if mode == "fslink":
        assert posted["data"] == {}, posted
    else:
        assert posted["data"]["nfiles"] == 2, posted

    status = cl.poll_job_status(JobType.PLUGIN, jid)
    assert status == "finishedSuccessfully", cl.get_job_status(JobType.PLUGIN, jid)

    listing = cl.get_plugin_job_json_data(jid, out)
    assert listing["job_output_path"] == out, listing
    assert sorted(listing["rel_file_paths"]) == sorted(expected), listing
    with open(os.path.join(storebase, out, "scan.txt")) as f:
        assert f.read() == "slice 1\n"

    upload = cl.submit_job(JobType.UPLOAD, jid, {"job_output_path": out})
    assert upload["compute"]["message"] == "uploadSkipped", upload
    deleted = cl.submit_job(JobType.DELETE, jid, {})
    if mode == "fslink":
        assert deleted["compute"]["status"] == "finishedSuccessfully", deleted
        assert not os.path.exists(os.path.join(storebase, f"key-{jid}")), "key dir left behind"
    else:
        assert deleted["compute"]["message"] == "deleteSkipped", deleted
    assert os.path.exists(os.path.join(storebase, out, "scan.txt")), "the outputs are CUBE's"

    for kind in (JobType.COPY, JobType.PLUGIN, JobType.UPLOAD, JobType.DELETE):
        cl.delete_job(kind, jid)

    print(json.dumps({"jid": jid, "mode": mode, "status": status, "files": listing["rel_file_paths"]}))


if __name__ == "__main__":
    main()
