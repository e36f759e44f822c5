import BackupChain
import Dispatch
import FoundationEssentials
import Glibc
import Logging
import QCowImage

/// The disks of one `backup --libvirt` run: each disk's backup is the engine's, on a thread of
/// its own, into its own repository (opened, locked and recovered by the engine as for any
/// backup), around ONE libvirt job (or, for a shut-off domain, none):
/// 1. every engine opens its repository and stops there (`opened`);
/// 2. this thread then begins the job for all the disks (`LibvirtBackup.live`) or opens each
///    disk file (`LibvirtBackup.offline`), and lets the engines go on with their sources;
/// 3. every engine writes its layer and stops before recording it (`written`, in the source's
///    check before the engine records a layer);
/// 4. only when every disk's layer was written may the engines record them; if any disk failed,
///    none does (each removes its unrecorded layer, as after any failed backup);
/// 5. the job ends once every engine is done with its export, and the checkpoints are settled.
/// A failure at any step stops every disk at its next meeting point; the first one is what the
/// run reports.
final class DiskRuns: @unchecked Sendable {
    /// Where the disks' engines wait for each other (and for this thread's decision).
    enum Meeting: Int {
        case opened = 0
        case written = 1
    }

    /// One disk's engine run (its fields are shared under the mutex).
    final class Slot {
        let disk: LibvirtDomain.Disk
        let repository: String
        var target: LibvirtBackup.Target?
        var plan: LibvirtBackup.Plan?
        var member: GroupMember?
        var result: BackupEngine.Result?
        /// The last meeting point reached (-1: none yet).
        var reached = -1
        var done = false
        var progress: (done: UInt64, total: UInt64) = (0, 0)
        init(disk: LibvirtDomain.Disk, repository: String) {
            self.disk = disk
            self.repository = repository
        }
    }

    /// An engine stopped because another disk (or the job) failed: not the run's error.
    struct Stopped: Error {}

    let request: LibvirtBackup.Request
    let layout: LibvirtBackup.Layout
    let logger: Logger
    let progress: ((UInt64, UInt64) -> Void)?
    let slots: [Slot]
    private var verdicts: [Bool?] = [nil, nil]
    /// The run's first real failure.
    private var failure: Error?
    private let mutex = ConditionLock()

    init(_ request: LibvirtBackup.Request, layout: LibvirtBackup.Layout, logger: Logger,
         progress: ((UInt64, UInt64) -> Void)?) {
        self.request = request
        self.layout = layout
        self.logger = logger
        self.progress = progress
        slots = layout.disks.map { Slot(disk: $0, repository: layout.repository(of: $0)) }
    }

    func run() throws -> LibvirtBackup.Outcome {
        let job = LiveJob(logger: logger)
        let workers = DispatchGroup()
        for (index, slot) in slots.enumerated() {
            DispatchQueue(label: "qbackup.libvirt.\(slot.disk.target)").async(group: workers) { self.work(index) }
        }
        var plans: [LibvirtBackup.Plan] = []
        var outside: Set<String>? = []
        var active = false
        var go = meet(.opened)
        if go {
            let targets = locked { slots.compactMap(\.target) }
            do {
                outside = LibvirtBackup.neededOutside(layout, targets: targets)
                active = try layout.domain.isActive()
                if active {
                    plans = try LibvirtBackup.live(request, layout: layout, targets: targets, outside: outside, job: job)
                } else {
                    for target in targets { plans.append(try LibvirtBackup.offline(request, target: target)) }
                }
                guard plans.count == slots.count else {
                    throw LiveError(.io, "internal error: \(plans.count) plans for \(slots.count) disks")
                }
                locked { for (slot, plan) in zip(slots, plans) { slot.plan = plan } }
            } catch {
                for plan in plans { plan.source.close() }
                plans = []
                noteFailure(error)
                go = false
            }
        }
        decide(.opened, go)
        var written = go && meet(.written)
        if written, active {
            #if DEBUG
            DebugHold.written()
            #endif
            // Aborted from outside (virsh domjobabort), libvirt ends the fleecing before the
            // export, so a read in between may see guest writes made after the point in time.
            // (When libvirtd cannot be asked, having restarted, QEMU's job lives on: go ahead.)
            let current: Int32?
            do { current = try layout.domain.currentJob() } catch { current = LibvirtDomain.backupOperation }
            if current != LibvirtDomain.backupOperation {
                noteFailure(LiveError(.io, "domain '\(layout.domain.name)': the backup job ended before every disk was read (aborted outside qbackup?), so what was read may not be of its point in time; no layer is recorded"))
                written = false
            }
        }
        decide(.written, written)
        workers.wait()

        let (committed, targets, results) = locked {
            (slots.map { $0.member?.committed ?? false }, slots.map(\.target), slots.map(\.result))
        }
        // The checkpoints the group's repositories need now: each disk's newest layer's (this
        // job's where it was recorded, the one before where not), and those outside the run.
        var keep = outside
        for (i, target) in targets.enumerated() {
            if committed[i], i < plans.count, let cp = plans[i].checkpoint { keep?.insert(cp) }
            else if let cp = target?.needed { keep?.insert(cp) }
        }
        job.finish(committed: committed.contains(true), keep: keep)

        if let failure = locked({ failure }) {
            let recorded = slots.indices.filter { committed[$0] }.map { slots[$0].disk.target }
            guard !recorded.isEmpty else { throw failure }
            // A disk whose layer could not be recorded after the others' were: those stay
            // (each repository goes on from its own last checkpoint, which is kept).
            throw LiveError((failure as? CodedError)?.errorCode ?? .io,
                            "\(failure); the layers of \(recorded.joined(separator: ", ")) were recorded, the others not (the next backup goes on from each disk's own last layer)")
        }
        var disks: [LibvirtBackup.DiskOutcome] = []
        for (i, slot) in slots.enumerated() {
            guard let result = results[i], i < plans.count else {
                throw LiveError(.io, "internal error: disk \(slot.disk.target) finished without a result")
            }
            disks.append(LibvirtBackup.DiskOutcome(target: slot.disk.target, repository: slot.repository, result: result,
                                                   reason: plans[i].reason, checkpoint: plans[i].checkpoint))
        }
        // Several disks may say the same (one shut-off domain, one job): once each.
        func once(_ lines: [String]) -> [String] {
            var seen: Set<String> = []
            return lines.filter { seen.insert($0).inserted }
        }
        return LibvirtBackup.Outcome(disks: disks, grouped: layout.grouped,
                                     notes: once(plans.flatMap(\.notes) + job.notes),
                                     warnings: once(plans.flatMap(\.warnings) + job.warnings + targets.compactMap { $0?.continued }))
    }

    /// One disk's engine run (on its own thread).
    private func work(_ index: Int) {
        let slot = slots[index]
        var engine = BackupEngine.Request(image: request.domain, repository: slot.repository, mode: request.mode,
                                          compression: request.compression, dryRun: false,
                                          clusterSize: request.clusterSize, takeOverBitmap: true)
        engine.tracking = .checkpoint(nil)
        let report: ((UInt64, UInt64) -> Void)? = progress == nil ? nil : { done, total in self.report(index, done, total) }
        do {
            let result = try BackupEngine.backup(engine, logger: logger, progress: report) { repo, engineRequest in
                let target = try LibvirtBackup.Target(self.request, layout: self.layout, disk: slot.disk, repo: repo,
                                                      engine: &engineRequest)
                self.locked { slot.target = target }
                try self.arrive(index, .opened)
                guard let plan = self.locked({ slot.plan }) else { throw Stopped() }
                engineRequest.mode = plan.incremental ? .incremental : .full
                engineRequest.tracking = .checkpoint(plan.checkpoint)
                if let image = plan.image { engineRequest.image = image }
                let member = GroupMember(plan.source, runs: self, index: index)
                self.locked { slot.member = member }
                return member
            }
            locked { slot.result = result }
            leave(index, nil)
        } catch {
            leave(index, error)
        }
    }

    /// A disk's engine has reached `meeting`: waits for this thread's decision; throws
    /// `Stopped` when the run is not to go on.
    func arrive(_ index: Int, _ meeting: Meeting) throws {
        let go: Bool = locked {
            slots[index].reached = meeting.rawValue
            mutex.broadcast()
            while verdicts[meeting.rawValue] == nil { mutex.wait() }
            return verdicts[meeting.rawValue] ?? false
        }
        if !go { throw Stopped() }
    }

    /// A disk's engine is done (with its error, if it failed).
    private func leave(_ index: Int, _ error: Error?) {
        locked {
            slots[index].done = true
            if let error, !(error is Stopped), failure == nil { failure = error }
            mutex.broadcast()
        }
    }

    /// Waits until every disk's engine reached `meeting` or is done; whether all are there
    /// (none failed).
    private func meet(_ meeting: Meeting) -> Bool {
        locked {
            while !slots.allSatisfy({ $0.reached >= meeting.rawValue || $0.done }) { mutex.wait() }
            return failure == nil && slots.allSatisfy { $0.reached >= meeting.rawValue && !$0.done }
        }
    }

    private func decide(_ meeting: Meeting, _ go: Bool) {
        locked {
            verdicts[meeting.rawValue] = go
            mutex.broadcast()
        }
    }

    private func noteFailure(_ error: Error) {
        locked { if failure == nil { failure = error } }
    }

    /// The run's progress: the sum over the disks.
    private func report(_ index: Int, _ done: UInt64, _ total: UInt64) {
        locked {
            slots[index].progress = (done, total)
            let sum = slots.reduce((done: UInt64(0), total: UInt64(0))) { ($0.done + $1.progress.done, $0.total + $1.progress.total) }
            progress?(sum.done, sum.total)
        }
    }

    private func locked<T>(_ body: () throws -> T) rethrows -> T { try mutex.locked(body) }
}

/// One disk's source in a run: the engine's check before it records the layer waits until
/// every disk's layer is written, and fails when another disk failed, so that no layer of a
/// job is recorded unless all are.
final class GroupMember: BackupSource {
    let inner: BackupSource
    let runs: DiskRuns
    let index: Int
    /// Whether the engine recorded the layer.
    private(set) var committed = false

    init(_ inner: BackupSource, runs: DiskRuns, index: Int) {
        self.inner = inner
        self.runs = runs
        self.index = index
    }

    var name: String { inner.name }
    var virtualSize: UInt64 { inner.virtualSize }
    var disk: BackupManifest.Source { inner.disk }
    var mode: BackupManifest.Mode { inner.mode }

    func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus {
        try inner.blockStatus(at: offset, maxLength: maxLength)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try inner.read(into: buffer, at: offset)
    }

    func willRead(_ ranges: [Range<UInt64>], chunk: Int, bufferSize: Int) throws {
        try inner.willRead(ranges, chunk: chunk, bufferSize: bufferSize)
    }

    func read(exchanging buffer: UnsafeMutableRawBufferPointer, count: Int, at offset: UInt64) throws
        -> UnsafeMutableRawBufferPointer? {
        try inner.read(exchanging: buffer, count: count, at: offset)
    }
    func bitmapState(_ name: String) throws -> TrackingBitmapState { try inner.bitmapState(name) }

    func forEachDirtyExtent(_ name: String, _ body: (Range<UInt64>) throws -> Void) throws {
        try inner.forEachDirtyExtent(name, body)
    }

    /// The engine calls this once the layer is durable (libvirt's sources reset nothing).
    func resetBitmap(_ name: String) throws {
        try inner.resetBitmap(name)
        committed = true
    }

    func checkUnchanged() throws {
        try inner.checkUnchanged()
        try runs.arrive(index, .written)
    }

    func close() { inner.close() }
}
