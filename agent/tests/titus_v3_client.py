"""A client this project did not write, for Titus's V3 API: stubs generated from our .proto files
with grpcio-tools, driving a real cluster as Spinnaker's Titus provider and Titus's clients do.

Usage: python3 titus_v3_client.py --api HOST:PORT[,HOST:PORT...] --protos DIR --app NAME
Exits 0 when every step holds; otherwise prints the step that failed and exits 1. Every wait is
bounded (--timeout seconds in all).
"""

import argparse
import glob
import os
import queue
import sys
import tempfile
import threading
import time

from grpc_tools import protoc
import grpc


def generate(protos, out):
    files = sorted(os.path.relpath(p, protos) for p in glob.glob(os.path.join(protos, "netflix/titus/*.proto")))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{protos}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"] + files
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {files}")
    sys.path.insert(0, out)


class Failed(Exception):
    pass


class Rotating:
    """One service over every replica: a call that finds its replica gone or between leaders
    (UNAVAILABLE) goes to the next one, for up to 20 s — as a Titus client behind a load balancer
    retries."""

    def __init__(self, stubs):
        self.stubs, self.at = stubs, 0

    def __getattr__(self, name):
        def call(*args, **kwargs):
            give_up = time.monotonic() + 20
            while True:
                stub = self.stubs[self.at % len(self.stubs)]
                try:
                    return getattr(stub, name)(*args, **kwargs)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                        raise
                    self.at += 1
                    time.sleep(0.2)

        return call


def check(cond, what):
    if not cond:
        raise Failed(what)
    print(f"ok: {what}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--protos", required=True)
    ap.add_argument("--app", required=True)
    ap.add_argument("--image", default="titus/busybox")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--target-group", help="an ALB target group ARN to put the service behind (AWS configured)")
    ap.add_argument("--leader-kill", action="store_true", help="half way, print LEADER-KILL and wait for a line on stdin")
    a = ap.parse_args()
    deadline = time.monotonic() + a.timeout

    out = tempfile.mkdtemp(prefix="titus-v3-stubs-")
    generate(a.protos, out)
    from netflix.titus import titus_base_pb2 as base
    from netflix.titus import titus_health_pb2 as health
    from netflix.titus import titus_health_pb2_grpc as health_grpc
    from netflix.titus import titus_job_api_pb2 as job
    from netflix.titus import titus_job_api_pb2_grpc as job_grpc
    from netflix.titus import titus_loadbalancer_api_pb2 as lb
    from netflix.titus import titus_loadbalancer_api_pb2_grpc as lb_grpc

    apis = a.api.split(",")
    # Each replica answers (a follower forwards writes): use a different one for each part.
    channels = [grpc.insecure_channel(api) for api in apis]
    jobs = [job_grpc.JobManagementServiceStub(c) for c in channels]
    J = Rotating(jobs)

    def left():
        return max(1.0, deadline - time.monotonic())

    def wait_for(what, probe, step=0.5):
        while time.monotonic() < deadline:
            got = probe()
            if got:
                print(f"ok: {what}", flush=True)
                return got
            time.sleep(step)
        raise Failed(f"timed out waiting for {what}")

    def refused(call, field, code=grpc.StatusCode.INVALID_ARGUMENT):
        try:
            call()
        except grpc.RpcError as e:
            return e.code() == code and field in (e.details() or ""), f"{e.code()}: {e.details()}"
        return False, "accepted"

    # Health, as Spinnaker's provider checks it on start-up.
    h = Rotating([health_grpc.HealthStub(c) for c in channels]).Check(health.HealthCheckRequest(), timeout=left())
    check(h.status == health.HealthCheckResponse.SERVING, "Health.Check answers SERVING")
    check(len(h.details) == 1 and h.details[0].HasField("details"), "with this server's details")

    def container(command, cpu=0.1, memory=64):
        return job.Container(
            resources=job.ContainerResources(cpu=cpu, memoryMB=memory, diskMB=100, networkMbps=10, allocateIP=True),
            securityProfile=job.SecurityProfile(),
            image=job.Image(name=a.image, tag="latest"),
            entryPoint=["sh", "-c"],
            command=[command],
            env={"GREETING": "hello"},
            attributes={"titusParameter.cpu.burstEnabled": "true"},
        )

    owner = job.Owner(teamEmail="team@example.com")
    batch = job.JobDescriptor(
        owner=owner,
        applicationName=a.app,
        capacityGroup="DEFAULT",
        jobGroupInfo=job.JobGroupInfo(stack="v3", detail="batch", sequence="v001"),
        attributes={"source": "spinnaker", "kind": "batch"},
        container=container("echo $GREETING"),
        batch=job.BatchJobSpec(
            size=2, runtimeLimitSec=300, retryPolicy=base.RetryPolicy(immediate=base.RetryPolicy.Immediate(retries=1))
        ),
        disruptionBudget=job.JobDisruptionBudget(
            selfManaged=job.JobDisruptionBudget.SelfManaged(relocationTimeMs=0),
            rateUnlimited=job.JobDisruptionBudget.RateUnlimited(),
        ),
    )
    service = job.JobDescriptor(
        owner=owner,
        applicationName=a.app,
        jobGroupInfo=job.JobGroupInfo(stack="v3", detail="web", sequence="v000"),
        attributes={"source": "spinnaker", "kind": "service"},
        container=container("sleep 600"),
        service=job.ServiceJobSpec(
            capacity=job.Capacity(min=1, desired=2, max=4),
            enabled=True,
            retryPolicy=base.RetryPolicy(
                exponentialBackOff=base.RetryPolicy.ExponentialBackOff(initialDelayMs=1000, maxDelayIntervalMs=10000, retries=5)
            ),
            migrationPolicy=job.MigrationPolicy(systemDefault=job.MigrationPolicy.SystemDefault()),
        ),
        disruptionBudget=job.JobDisruptionBudget(
            availabilityPercentageLimit=job.JobDisruptionBudget.AvailabilityPercentageLimit(percentageOfHealthyContainers=50),
            ratePerInterval=job.JobDisruptionBudget.RatePerInterval(intervalMs=60000, limitPerInterval=5),
            timeWindows=[
                base.TimeWindow(
                    days=[base.Monday, base.Tuesday, base.Wednesday, base.Thursday, base.Friday, base.Saturday, base.Sunday],
                    hourlyTimeWindows=[base.TimeWindow.HourlyTimeWindow(startHour=0, endHour=24)],
                    timeZone="UTC",
                )
            ],
        ),
    )

    # What we cannot honor is refused, naming Titus's field; nothing is created.
    efs = job.JobDescriptor()
    efs.CopyFrom(batch)
    efs.container.resources.efsMounts.add(efsId="fs-1", mountPoint="/efs")
    ok, why = refused(lambda: J.CreateJob(efs, timeout=left()), "container.resources.efsMounts")
    check(ok, f"an EFS mount is refused naming container.resources.efsMounts ({why})")
    bad = job.JobDescriptor()
    bad.CopyFrom(batch)
    bad.container.resources.cpu = float("nan")
    ok, why = refused(lambda: J.CreateJob(bad, timeout=left()), "cpu")
    check(ok, f"a NaN cpu is refused naming the field ({why})")

    # ObserveJobs, started before the jobs exist: the (empty) snapshot and SnapshotEnd first, then
    # the changes — both jobs created, the batch tasks finishing, the service's tasks Started.
    events = queue.Queue()

    def observe():
        try:
            q = job.ObserveJobsQuery(filteringCriteria={"applicationName": a.app}, jobFields=["status", "jobDescriptor.applicationName"])
            for n in J.ObserveJobs(q, timeout=left()):
                events.put(n)
        except grpc.RpcError as e:
            events.put(e)

    def next_event():
        while time.monotonic() < deadline:
            try:
                n = events.get(timeout=1)
            except queue.Empty:
                continue
            if isinstance(n, grpc.RpcError):
                raise Failed(f"ObserveJobs ended: {n.code()} {n.details()}")
            return n
        raise Failed("timed out waiting for a notification")

    threading.Thread(target=observe, daemon=True).start()
    n = next_event()
    check(n.WhichOneof("Notification") == "snapshotEnd" and n.timestamp > 0, "ObserveJobs: SnapshotEnd (with its timestamp) after an empty snapshot")

    batch_id = jobs[1 % len(jobs)].CreateJob(batch, timeout=left()).id
    service_id = jobs[-1].CreateJob(service, timeout=left()).id
    check(batch_id and service_id and batch_id != service_id, f"CreateJob (through followers too): batch {batch_id}, service {service_id}")
    L = Rotating([lb_grpc.LoadBalancerServiceStub(c) for c in channels])
    if a.target_group:
        # As Spinnaker does: the job, then its target group.
        L.AddLoadBalancer(lb.AddLoadBalancerRequest(jobId=service_id, loadBalancerId=lb.LoadBalancerId(id=a.target_group)), timeout=left())
        got = L.GetJobLoadBalancers(job.JobId(id=service_id), timeout=left())
        check([l.id for l in got.loadBalancers] == [a.target_group], "AddLoadBalancer, then GetJobLoadBalancers lists it")

    seen_jobs, finished, started = set(), set(), set()
    while not (len(finished) >= 2 and len(started) >= 2 and len(seen_jobs) == 2):
        n = next_event()
        kind = n.WhichOneof("Notification")
        if kind == "jobUpdate":
            seen_jobs.add(n.jobUpdate.job.id)
            if n.jobUpdate.job.jobDescriptor.applicationName != a.app or n.jobUpdate.job.jobDescriptor.HasField("container"):
                raise Failed(f"a job update not projected to jobFields: {n.jobUpdate.job}")
        elif kind == "taskUpdate":
            t = n.taskUpdate.task
            if t.jobId == batch_id and t.status.state == job.TaskStatus.Finished and t.status.reasonCode == "normal":
                finished.add(t.id)
            if t.jobId == service_id and t.status.state == job.TaskStatus.Started:
                started.add(t.id)
    check(seen_jobs == {batch_id, service_id}, "both jobs were observed, projected to jobFields")
    check(len(finished) >= 2, "the batch job's 2 tasks were seen Finished (normal)")
    check(len(started) >= 2, "the service's 2 tasks were seen Started")

    # FindJobs with Titus's filters and projections (active jobs; a finished one by its id).
    def find(criteria, size=10, cursor="", number=0, fields=()):
        page = base.Page(pageSize=size, cursor=cursor, pageNumber=number)
        return J.FindJobs(job.JobQuery(page=page, filteringCriteria=criteria, fields=list(fields)), timeout=left())

    r = find({"applicationName": a.app, "jobType": "SERVICE"})
    check([j.id for j in r.items] == [service_id], "FindJobs applicationName + jobType=SERVICE")
    r = find({"applicationName": a.app, "jobType": "SERVICE", "attributes": "kind:service,kind:nothing", "attributes.op": "or"})
    check([j.id for j in r.items] == [service_id], "FindJobs attributes with attributes.op=or")
    r = find({"applicationName": a.app, "attributes": "kind:service,kind:nothing"})
    check(not r.items, "FindJobs attributes: all must match by default")
    r = find({"jobGroupStack": "v3", "jobGroupDetail": "web", "applicationName": a.app})
    check([j.id for j in r.items] == [service_id], "FindJobs jobGroupStack + jobGroupDetail")
    r = find({"imageName": a.image, "imageTag": "latest", "applicationName": a.app, "jobType": "SERVICE", "jobState": "Accepted"})
    check([j.id for j in r.items] == [service_id], "FindJobs imageName + imageTag + jobState")
    projected = find({"jobIds": batch_id}, fields=["status"])
    check(len(projected.items) == 1, "FindJobs by jobIds finds the batch job, finished or not")
    check(projected.items[0].HasField("status") and not projected.items[0].HasField("jobDescriptor"), "fields=[status] projects")
    ok, why = refused(lambda: find({"colour": "red"}), "colour")
    check(ok, f"an unknown filter is refused naming it ({why})")

    if a.leader_kill:
        # The rest runs under the next leader: the driver kills this one now.
        print("LEADER-KILL", flush=True)
        sys.stdin.readline()
        # A CreateJob retried after an unknown outcome, with the same x-request-id: one job.
        once = job.JobDescriptor()
        once.CopyFrom(service)
        once.jobGroupInfo.sequence = "v009"
        once.service.capacity.CopyFrom(job.Capacity(min=0, desired=0, max=1))
        meta = (("x-request-id", f"{a.app}-create-once"),)
        first = J.CreateJob(once, metadata=meta, timeout=left()).id
        again = J.CreateJob(once, metadata=meta, timeout=left()).id
        check(first == again, "a retried CreateJob (same x-request-id) answers the same job")
        same = J.FindJobs(job.JobQuery(filteringCriteria={"applicationName": a.app, "jobGroupSequence": "v009"}), timeout=left())
        check([j.id for j in same.items] == [first], "and made one job")
        J.KillJob(job.JobId(id=first), timeout=left())

    # FindTasks.
    tr = J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": batch_id, "taskStates": "Finished", "taskStateReasons": "normal"}, page=base.Page(pageSize=10)), timeout=left())
    check(len(tr.items) == 2, "FindTasks jobIds + taskStates=Finished + taskStateReasons=normal: 2")
    check(all(t.status.state == job.TaskStatus.Finished for t in tr.items), "Finished is Titus's 6")
    check(all("taskIndex" in t.taskContext for t in tr.items), "tasks carry Titus's taskIndex context")
    tr = J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": service_id, "taskStates": "Started"}, fields=["status"]), timeout=left())
    check(len(tr.items) == 2 and not tr.items[0].taskContext and not tr.items[0].jobId, "FindTasks fields=[status] projects")
    one = J.FindTask(job.TaskId(id=tr.items[0].id), timeout=left())
    check(one.jobId == service_id and one.status.state == job.TaskStatus.Started, "FindTask")
    got = J.FindJob(job.JobId(id=service_id), timeout=left())
    budget = got.jobDescriptor.disruptionBudget
    check(budget.availabilityPercentageLimit.percentageOfHealthyContainers == 50, "FindJob returns the budget as given")
    check(budget.ratePerInterval.limitPerInterval == 5 and budget.timeWindows[0].timeZone == "UTC", "its rate and window too")

    # Eviction, judged by that budget: 2 Started of desired 2, at least 50% kept available -> 1.
    from netflix.titus import titus_eviction_api_pb2 as eviction
    from netflix.titus import titus_eviction_api_pb2_grpc as eviction_grpc
    E = Rotating([eviction_grpc.EvictionServiceStub(c) for c in channels])
    kept, evicted = tr.items[0].id, tr.items[1].id
    q = E.GetEvictionQuota(base.Reference(jobId=service_id), timeout=left())
    check(q.quota == 1 and q.target.jobId == service_id, f"GetEvictionQuota of the job: 1 of its 2 may go ({q})")
    q = E.GetEvictionQuota(base.Reference(taskId=evicted), timeout=left())
    check(q.quota == 1 and q.target.taskId == evicted, f"GetEvictionQuota of a task: 1 ({q})")
    r = E.TerminateTask(eviction.TaskTerminateRequest(taskId=evicted, reason="v3 client"), timeout=left())
    check(r.allowed, f"TerminateTask within the quota is allowed ({r})")
    # Its replacement is not Started yet (it takes a container start): the budget holds the other.
    r = E.TerminateTask(eviction.TaskTerminateRequest(taskId=kept, reason="v3 client"), timeout=left())
    check(not r.allowed and r.reasonCode == "disruptionBudget" and "available" in r.reasonMessage, f"TerminateTask beyond it: allowed=false with the reason ({r})")
    q = E.GetEvictionQuota(base.Reference(taskId=kept), timeout=left())
    check(q.quota == 0 and "available" in q.message, f"and GetEvictionQuota says 0 and why ({q})")
    q = E.GetEvictionQuota(base.Reference(system=base.Reference.System()), timeout=left())
    check(q.quota == 2**32 - 1, f"no system-level budget here: unlimited ({q})")
    ok, why = refused(lambda: E.GetEvictionQuota(base.Reference(), timeout=left()), "reference")
    check(ok, f"a quota of nothing named is refused naming reference ({why})")
    ok, why = refused(lambda: E.GetEvictionQuota(base.Reference(jobId="no-such-job"), timeout=left()), "jobId", grpc.StatusCode.NOT_FOUND)
    check(ok, f"an unknown job's quota is NOT_FOUND ({why})")
    wait_for("the evicted task replaced: 2 Started", lambda: evicted not in [t.id for t in J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": service_id, "taskStates": "Started"}), timeout=left()).items] and len(J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": service_id, "taskStates": "Started"}), timeout=left()).items) == 2)

    # Capacity, processes, status, budget, attributes.
    J.UpdateJobCapacity(job.JobCapacityUpdate(jobId=service_id, Capacity=job.Capacity(min=1, desired=3, max=4)), timeout=left())
    wait_for("UpdateJobCapacity: 3 tasks Started", lambda: len(J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": service_id, "taskStates": "Started"}), timeout=left()).items) == 3)
    def tasks_page(size, cursor="", number=0):
        q = job.TaskQuery(filteringCriteria={"jobIds": service_id, "taskStates": "Started"}, page=base.Page(pageSize=size, cursor=cursor, pageNumber=number))
        return J.FindTasks(q, timeout=left())

    pages, cursor = [], ""
    while True:
        r = tasks_page(1, cursor)
        check(r.pagination.totalItems == 3 and r.pagination.totalPages == 3, f"page {len(pages) + 1}: totalItems 3 in 3 pages")
        pages.append(r.items[0].id)
        if not r.pagination.hasMore:
            break
        cursor = r.pagination.cursor
    check(len(pages) == 3 and len(set(pages)) == 3, "the cursor pages cover the 3 tasks once each")
    check([t.id for t in tasks_page(1, number=2).items] == [pages[2]], "pageNumber 2 is the third page")
    check(not tasks_page(1, number=3).items, "a page past the end is empty")
    ok, why = refused(lambda: tasks_page(1000, number=11), "pageNumber")
    check(ok, f"a page by number past the first 10,000 items is refused naming pageNumber ({why})")
    from google.protobuf import wrappers_pb2
    J.UpdateJobCapacityWithOptionalAttributes(
        job.JobCapacityUpdateWithOptionalAttributes(
            jobId=service_id, jobCapacityWithOptionalAttributes=job.JobCapacityWithOptionalAttributes(max=wrappers_pb2.UInt32Value(value=5))
        ),
        timeout=left(),
    )
    c = J.FindJob(job.JobId(id=service_id), timeout=left()).jobDescriptor.service.capacity
    check((c.min, c.desired, c.max) == (1, 3, 5), "UpdateJobCapacityWithOptionalAttributes changes only max")
    J.UpdateJobProcesses(job.JobProcessesUpdate(jobId=service_id, serviceJobProcesses=job.ServiceJobSpec.ServiceJobProcesses(disableDecreaseDesired=True)), timeout=left())
    p = J.FindJob(job.JobId(id=service_id), timeout=left()).jobDescriptor.service.serviceJobProcesses
    check(p.disableDecreaseDesired and not p.disableIncreaseDesired, "UpdateJobProcesses")
    ok, why = refused(lambda: J.UpdateJobCapacity(job.JobCapacityUpdate(jobId=service_id, Capacity=job.Capacity(min=1, desired=2, max=5)), timeout=left()), "desired", grpc.StatusCode.FAILED_PRECONDITION)
    check(ok or "decrease" in why.lower(), f"a decrease is refused while disableDecreaseDesired ({why})")
    J.UpdateJobProcesses(job.JobProcessesUpdate(jobId=service_id, serviceJobProcesses=job.ServiceJobSpec.ServiceJobProcesses()), timeout=left())
    zoned = job.JobDisruptionBudget()
    zoned.CopyFrom(budget)
    zoned.timeWindows[0].timeZone = "America/Los_Angeles"
    ok, why = refused(lambda: J.UpdateJobDisruptionBudget(job.JobDisruptionBudgetUpdate(jobId=service_id, disruptionBudget=zoned), timeout=left()), "timeZone")
    check(ok, f"a budget window outside UTC is refused naming timeZone ({why})")
    J.UpdateJobDisruptionBudget(
        job.JobDisruptionBudgetUpdate(
            jobId=service_id,
            disruptionBudget=job.JobDisruptionBudget(
                unhealthyTasksLimit=job.JobDisruptionBudget.UnhealthyTasksLimit(limitOfUnhealthyContainers=1),
                ratePercentagePerHour=job.JobDisruptionBudget.RatePercentagePerHour(maxPercentageOfContainersRelocatedInHour=25),
            ),
        ),
        timeout=left(),
    )
    b = J.FindJob(job.JobId(id=service_id), timeout=left()).jobDescriptor.disruptionBudget
    check(b.unhealthyTasksLimit.limitOfUnhealthyContainers == 1 and b.ratePercentagePerHour.maxPercentageOfContainersRelocatedInHour == 25, "UpdateJobDisruptionBudget")
    J.UpdateJobAttributes(job.JobAttributesUpdate(jobId=service_id, attributes={"owner.slack": "#team"}), timeout=left())
    J.DeleteJobAttributes(job.JobAttributesDeleteRequest(jobId=service_id, keys=["kind"]), timeout=left())
    attrs = J.FindJob(job.JobId(id=service_id), timeout=left()).jobDescriptor.attributes
    check(attrs.get("owner.slack") == "#team" and "kind" not in attrs, "Update/DeleteJobAttributes")
    J.UpdateJobStatus(job.JobStatusUpdate(id=service_id, enableStatus=False), timeout=left())
    check(not J.FindJob(job.JobId(id=service_id), timeout=left()).jobDescriptor.service.enabled, "UpdateJobStatus disables")
    J.UpdateJobStatus(job.JobStatusUpdate(id=service_id, enableStatus=True), timeout=left())

    # Task attributes.
    labelled = tr.items[0].id
    J.UpdateTaskAttributes(job.TaskAttributesUpdate(taskId=labelled, attributes={"canary": "yes", "zone": "a"}), timeout=left())
    J.DeleteTaskAttributes(job.TaskAttributesDeleteRequest(taskId=labelled, keys=["zone"]), timeout=left())
    check(dict(J.FindTask(job.TaskId(id=labelled), timeout=left()).attributes) == {"canary": "yes"}, "Update/DeleteTaskAttributes")
    ok, why = refused(lambda: J.UpdateTaskAttributes(job.TaskAttributesUpdate(taskId=labelled, attributes={"titus.x": "1"}), timeout=left()), "titus.x")
    check(ok, f"a reserved task attribute key is refused naming it ({why})")

    # KillTask with shrink: desired goes down by one and the task is not replaced.
    victim = J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": service_id, "taskStates": "Started"}), timeout=left()).items[0]
    J.KillTask(job.TaskKillRequest(taskId=victim.id, shrink=True), timeout=left())
    c = J.FindJob(job.JobId(id=service_id), timeout=left()).jobDescriptor.service.capacity
    check(c.desired == 2, "KillTask shrink=true lowers desired")

    # ObserveJobsWithKeepAlive: the query, then a keep-alive answered in the stream.
    requests = queue.Queue()
    requests.put(job.ObserveJobsWithKeepAliveRequest(query=job.ObserveJobsQuery(filteringCriteria={"jobIds": service_id})))

    def outgoing():
        while True:
            r = requests.get()
            if r is None:
                return
            yield r

    stream = J.ObserveJobsWithKeepAlive(outgoing(), timeout=left())
    saw_end, snapshot = False, set()
    for n in stream:
        kind = n.WhichOneof("Notification")
        if kind == "jobUpdate" and not saw_end:
            snapshot.add(n.jobUpdate.job.id)
        if kind == "snapshotEnd" and not saw_end:
            saw_end = True
            check(snapshot == {service_id}, "ObserveJobsWithKeepAlive: the snapshot (the job) came before SnapshotEnd")
            requests.put(job.ObserveJobsWithKeepAliveRequest(keepAliveRequest=base.KeepAliveRequest(requestId=42, timestamp=1)))
        if kind == "keepAliveResponse":
            check(saw_end and n.keepAliveResponse.request.requestId == 42, "a keep-alive is answered after SnapshotEnd, with its request")
            break
    requests.put(None)
    stream.cancel()

    # A sibling: the same container in another sequence of the same stack (MoveTask's target).
    sibling = job.JobDescriptor()
    sibling.CopyFrom(service)
    sibling.jobGroupInfo.sequence = "v001"
    sibling.service.capacity.CopyFrom(job.Capacity(min=0, desired=1, max=4))
    sibling_id = J.CreateJob(sibling, timeout=left()).id
    wait_for("the sibling job's task Started", lambda: len(J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": sibling_id, "taskStates": "Started"}), timeout=left()).items) == 1)
    mover = J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": service_id, "taskStates": "Started"}), timeout=left()).items[0]
    move = lambda: J.MoveTask(job.TaskMoveRequest(sourceJobId=service_id, targetJobId=sibling_id, taskId=mover.id), timeout=left())

    # Load balancers.
    lbs = L.GetJobLoadBalancers(job.JobId(id=service_id), timeout=left())
    if a.target_group:
        every = L.GetAllLoadBalancers(lb.GetAllLoadBalancersRequest(page=base.Page(pageSize=100)), timeout=left())
        mine = [r for r in every.jobLoadBalancers if r.jobId == service_id]
        check(len(mine) == 1 and [l.id for l in mine[0].loadBalancers] == [a.target_group], "GetAllLoadBalancers lists the job's")
        print("targets: the service is behind the target group", flush=True)
        ok, why = refused(move, "load balancers", grpc.StatusCode.FAILED_PRECONDITION)
        check(ok, f"a task of a job behind load balancers does not move ({why})")
        L.RemoveLoadBalancer(lb.RemoveLoadBalancerRequest(jobId=service_id, loadBalancerId=lb.LoadBalancerId(id=a.target_group)), timeout=left())
        lbs = L.GetJobLoadBalancers(job.JobId(id=service_id), timeout=left())
        check(lbs.jobId == service_id and not lbs.loadBalancers, "RemoveLoadBalancer: none left")
    else:
        check(lbs.jobId == service_id and not lbs.loadBalancers, "GetJobLoadBalancers: none (no AWS here)")

    # Autoscaling: no policies here; Spinnaker's start-up reads get none, a policy is refused.
    from google.protobuf import empty_pb2
    from netflix.titus import titus_autoscale_api_pb2 as scale
    from netflix.titus import titus_autoscale_api_pb2_grpc as scale_grpc
    S = Rotating([scale_grpc.AutoScalingServiceStub(c) for c in channels])
    check(not S.GetAllScalingPolicies(empty_pb2.Empty(), timeout=left()).items, "GetAllScalingPolicies: none")
    check(not S.GetJobScalingPolicies(job.JobId(id=service_id), timeout=left()).items, "GetJobScalingPolicies: none")
    ok, why = refused(lambda: S.SetAutoScalingPolicy(scale.PutPolicyRequest(jobId=service_id), timeout=left()), "scalingPolicy", grpc.StatusCode.FAILED_PRECONDITION)
    check(ok, f"SetAutoScalingPolicy is refused, not ignored ({why})")

    # MoveTask: to a job running the same container (another sequence of the same stack).
    ok, why = refused(lambda: J.MoveTask(job.TaskMoveRequest(sourceJobId=service_id, targetJobId=batch_id, taskId=mover.id), timeout=left()), "target_job_id", grpc.StatusCode.FAILED_PRECONDITION)
    check(ok, f"a move to a job that is not a compatible service is refused naming target_job_id ({why})")
    move()
    moved = J.FindTask(job.TaskId(id=mover.id), timeout=left())
    check(moved.jobId == sibling_id and moved.status.state == job.TaskStatus.Started, "MoveTask: the task is the sibling's, still Started")
    check(moved.taskContext.get("movedFromJob") == service_id, "and says where it came from")
    caps = [J.FindJob(job.JobId(id=i), timeout=left()).jobDescriptor.service.capacity.desired for i in (service_id, sibling_id)]
    check(caps == [1, 2], f"the source's desired went down by one, the target's up: {caps}")
    sibling_tasks = lambda: [t.id for t in J.FindTasks(job.TaskQuery(filteringCriteria={"jobIds": sibling_id, "taskStates": "Started"}), timeout=left()).items]
    check(len(sibling_tasks()) == 2 and mover.id in sibling_tasks(), "the sibling holds 2 Started tasks, the moved one among them")
    J.KillJob(job.JobId(id=sibling_id), timeout=left())

    J.KillJob(job.JobId(id=service_id), timeout=left())
    wait_for("KillJob: the service job finishes", lambda: J.FindJob(job.JobId(id=service_id), timeout=left()).status.state == job.JobStatus.Finished)
    print("titus v3 client: all steps held", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        print(f"FAILED: {e}", flush=True)
        sys.exit(1)
