"""One out-of-network plugin job through a pfcon-compatible server, driven by
python-pfconclient exactly as CUBE drives a compute resource: log in, read the server
info, post the copy job (skipped), post the plugin job with a zip of the inputs, poll,
fetch the outputs as a zip, post the upload (skipped) and delete jobs, and remove every
job. Also checks that a bad token and bad credentials are refused the way the client
expects.

    python zipfile_cycle.py URL USER PASSWORD IMAGE WORKDIR

URL is the API base (http://host:port/api/v1/); IMAGE carries /plugins/copy.sh (the test
plugin that copies its inputs to its outputs). Prints what it found as one JSON line and
exits non-zero at the first thing that differs from pfcon.
"""

import json
import os
import sys

from pfconclient import client
from pfconclient.client import JobType
from pfconclient.exceptions import PfconRequestException, PfconRequestInvalidTokenException


def main():
    url, user, password, image, work = sys.argv[1:6]

    try:
        client.Client.get_auth_token(url + "auth-token/", user, "not-the-password")
        raise AssertionError("bad credentials were accepted")
    except PfconRequestException as e:
        assert e.code == 400, e
        assert "Unable to log in with provided credentials." in str(e), e

    token = client.Client.get_auth_token(url + "auth-token/", user, password)
    cl = client.Client(url, token)
    cl.initial_wait = 0.5  # CUBE waits 2 s first; the job is quick here

    info = cl.get_server_info()
    assert info["storage_env"] == "zipfile", info
    assert info["pfcon_innetwork"] is False, info
    assert cl.requires_copy_job is False and cl.requires_upload_job is False, info

    try:
        client.Client(url, "not-a-token").get_server_info()
        raise AssertionError("a bad token was accepted")
    except PfconRequestInvalidTokenException as e:
        assert e.code == 401, e

    inputs = os.path.join(work, "inputs")
    files = {
        "scan.txt": "slice 1\nslice 2\n",
        "meta/subject.json": '{"age": 7}\n',
        "meta/deep/notes.txt": "nothing remarkable\n",
    }
    for name, text in files.items():
        path = os.path.join(inputs, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    jid = "chris-jid-7"
    copy = cl.submit_job(JobType.COPY, jid, {"input_dirs": ["home/cube/uploads"], "output_dir": "home/cube/feeds/7/out"})
    assert copy["compute"]["status"] == "finishedSuccessfully", copy
    assert copy["compute"]["message"] == "copySkipped", copy

    descriptors = {
        "entrypoint": ["/bin/sh", "/plugins/copy.sh"],
        "args": ["--saveinputmeta", "yes"],
        "args_path_flags": [],
        "auid": "cube",
        "number_of_workers": 1,
        "cpu_limit": 1000,
        "memory_limit": 200,
        "gpu_limit": 0,
        "image": image,
        "type": "ds",
        "env": ["CHRIS_USER_TOKEN=secret-of-cube"],
    }
    posted = cl.submit_job(JobType.PLUGIN, jid, descriptors, client.Client.create_zip_file(inputs))
    assert posted["data"]["nfiles"] == len(files), posted
    assert posted["compute"]["status"] in ("notStarted", "started"), posted

    status = cl.poll_job_status(JobType.PLUGIN, jid)
    assert status == "finishedSuccessfully", cl.get_job_status(JobType.PLUGIN, jid)
    final = cl.get_job_status(JobType.PLUGIN, jid)
    assert final["compute"]["jid"] == jid, final
    assert "secret-of-cube" not in json.dumps(final), "an env value leaked into the job object"

    outputs = os.path.join(work, "outputs")
    cl.get_plugin_job_files(jid, outputs)
    for name, text in files.items():
        with open(os.path.join(outputs, name)) as f:
            assert f.read() == text, name
    assert os.path.exists(os.path.join(outputs, "run.json"))

    upload = cl.submit_job(JobType.UPLOAD, jid, {"job_output_path": "home/cube/feeds/7/out"})
    assert upload["compute"]["message"] == "uploadSkipped", upload
    deleted = cl.submit_job(JobType.DELETE, jid, {})
    assert deleted["compute"]["status"] == "finishedSuccessfully", deleted
    assert cl.get_job_status(JobType.DELETE, jid)["compute"]["status"] == "finishedSuccessfully"

    for kind in (JobType.COPY, JobType.PLUGIN, JobType.UPLOAD, JobType.DELETE):
        cl.delete_job(kind, jid)  # raises unless 204

    print(json.dumps({"jid": jid, "status": status, "outputs": sorted(os.listdir(outputs))}))


if __name__ == "__main__":
    main()
