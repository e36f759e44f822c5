import ArgumentParser
import FoundationEssentials
import Glibc
import BackupChain
import LiveSource
import QCowImage

/// `qbackup backup IMAGE --repo DIR [--bitmap NAME] [--full|--incremental] [--compress …] [--dry-run]`
struct BackupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Back up a qcow2 disk into a repository: a full layer, or the changes its dirty bitmap tracked.",
        discussion: """
            The first backup into an empty repository is full: the whole guest-visible disk (read \
            through its backing chain) becomes a standalone qcow2 layer, and the tracking bitmap \
            starts empty and enabled in IMAGE. Later backups are incremental: exactly the ranges the \
            bitmap marks dirty become a new layer on top of the chain, then the bitmap is cleared. \
            The bitmap is touched only after the new layer and the manifest are safely on disk, so \
            a crash loses no change. The image must not be in use by a VM or qemu-nbd.

            Nightly, from cron:
              0 2 * * *  qbackup backup /var/lib/libvirt/images/vm.qcow2 --repo /backup/vm

            With --nbd URI (nbd://HOST[:PORT]/EXPORT, nbds://…, nbd+unix:///EXPORT?socket=PATH) the \
            data comes from an NBD export someone else set up (qemu-nbd, a pull-mode export): with \
            --bitmap NAME the changes come from its qemu:dirty-bitmap:NAME context, else every layer \
            is full. qbackup never resets that bitmap: where its tracking starts is the exporter's \
            business.

            With --libvirt DOMAIN the disks of a VM that libvirt manages (--connect URI, default \
            qemu:///system; qemu+ssh://root@host/system for another host) are backed up through \
            libvirt's checkpoints and pull-mode backup, at one point in time; a shut-off domain \
            from its disk files, into the same chains. One disk (the domain's only one, or \
            --disk TARGET) goes into DIR itself; several (--disk repeated, or all of the \
            domain's) in one libvirt job into DIR/TARGET each. Nightly:
              0 2 * * *  qbackup backup --libvirt vm1 --repo /backup/vm1

            With --qmp SOCKET the disk of a running QEMU is backed up through QEMU's own NBD server, \
            at one point in time (a fleecing overlay in the image's folder or --fleece-dir), into the \
            same chain as offline backups of its image file, with the same bitmap (persistent in QEMU). \
            Give qbackup a QMP socket of its own: -qmp unix:/run/vm1.qmp,server=on,wait=off. Nightly, \
            with the VM running:
              0 2 * * *  qbackup backup --qmp /run/vm1.qmp --repo /backup/vm1
            """)

    @Argument(help: "The qcow2 disk image to back up (not with --nbd).", completion: .file()) var image: String?

    @Option(name: .long, help: "Back up an NBD export instead of an image file (a URI as libnbd parses it).")
    var nbd: String?

    @Option(name: .long, help: "With --nbd: the name the repository records for the disk (default: the URI).")
    var sourceName: String?

    @Option(name: .long, help: "Back up the disk of a running QEMU through this QMP socket (one for qbackup alone).")
    var qmp: String?

    @Option(name: .long, help: "With --qmp: the disk's qcow2 format node (default: the VM's only disk).")
    var node: String?

    @Option(name: .long, help: "With --qmp: folder of the fleecing overlay and NBD socket (default: the image's folder).")
    var fleeceDir: String?

    @Option(name: .long, help: "With --qmp: use the NBD server QEMU already runs, unix:PATH or HOST:PORT.")
    var nbdServer: String?

    @Option(name: .long, help: "Back up a disk of this libvirt domain (name or UUID) through libvirt's API.")
    var libvirt: String?

    @Option(name: .long, help: "With --libvirt: the libvirt URI (default: qemu:///system).")
    var connect: String?

    @Option(name: .long, help: ArgumentHelp(
        "With --libvirt: a disk's target, e.g. vda; repeat it for several (default: every disk of the domain).",
        discussion: "One disk is backed up into DIR itself; several in one libvirt job, at one point in time, into DIR/TARGET each."))
    var disk: [String] = []

    @Option(name: .long, help: "The repository folder (created if missing).", completion: .directory) var repo: String

    @Option(name: .long, help: "The tracking bitmap (default: qbackup-<repository id>).") var bitmap: String?

    @Flag(name: .long, help: ArgumentHelp(
        "Let a new repository use a --bitmap that already exists in IMAGE.",
        discussion: "The bitmap may belong to another repository, which then misses the changes this one resets."))
    var takeOverBitmap = false

    @Flag(name: .long, help: "Take a full backup even if an incremental one is possible.") var full = false
    @Flag(name: .long, help: "Refuse unless an incremental backup is possible.") var incremental = false

    @Option(name: .long, help: "Compress the layer's clusters: none, zlib or zstd.")
    var compress = CompressionArgument(type: nil)

    @Option(name: .long, parsing: .unconditional, help: "Cluster size of the layers of a new repository (e.g. 64K).",
            transform: parseClusterSize)
    var clusterSize: Int?

    @Flag(name: .long, help: "Report what would be copied; change nothing.") var dryRun = false

    @OptionGroup var options: GlobalOptions
    @OptionGroup var progressOptions: ProgressOptions

    func validate() throws {
        if full && incremental { throw ValidationError("--full and --incremental exclude each other") }
        if [image != nil, nbd != nil, qmp != nil, libvirt != nil].filter({ $0 }).count != 1 {
            throw ValidationError("give one of IMAGE, --nbd URI, --qmp SOCKET or --libvirt DOMAIN")
        }
        if libvirt == nil && (connect != nil || !disk.isEmpty) { throw ValidationError("--connect and --disk go with --libvirt") }
        if libvirt != nil && (bitmap != nil || takeOverBitmap) {
            throw ValidationError("--bitmap and --take-over-bitmap do not apply to --libvirt (libvirt tracks changes with checkpoints)")
        }
        if qmp == nil && (node != nil || fleeceDir != nil || nbdServer != nil) {
            throw ValidationError("--node, --fleece-dir and --nbd-server go with --qmp")
        }
        if sourceName != nil && nbd == nil { throw ValidationError("--source-name goes with --nbd") }
        if nbd != nil && takeOverBitmap { throw ValidationError("--take-over-bitmap does not apply to --nbd (qbackup resets no bitmap of an export)") }
        // Swift repairs invalid UTF-8 in arguments into U+FFFD: look at the bytes given.
        if let bitmap, bitmap.unicodeScalars.contains("\u{FFFD}"), !CommandLine.argumentsAreValidUTF8 {
            throw ValidationError("--bitmap: a bitmap name must be valid UTF-8")
        }
        do {
            try request().validate()
        } catch let error as CodedError {
            throw ValidationError(error.description)
        }
    }

    func request() -> BackupEngine.Request {
        let mode: BackupEngine.Mode = full ? .full : incremental ? .incremental : .auto
        return BackupEngine.Request(image: image ?? nbd ?? qmp ?? "", repository: repo, bitmap: bitmap, mode: mode, compression: compress.type,
                                    dryRun: dryRun, clusterSize: clusterSize, takeOverBitmap: takeOverBitmap)
    }

    func run() throws {
        try ExitStatus.run(json: options.json) {
            let request = request()
            let progress = progressOptions.reporter("backup")
            let result: BackupEngine.Result
            // Why a full layer was taken (the live modes decide it before the engine runs).
            var reason: String?
            var checkpoint: String?
            var notes: [String] = []
            // Before a QMP or NBD connection is made: only --libvirt keeps a group's top folder.
            if libvirt == nil { try BackupRepository.refuseGroupTop(repo) }
            if let libvirt {
                // libvirt's client writes to the daemon's socket: a libvirtd restarted mid-job must
                // give a warning line (the next run aborts the job), not a silent death by SIGPIPE
                // after the layer was recorded.
                signal(SIGPIPE, SIG_IGN)
                let outcome = try LibvirtBackup.backup(
                    LibvirtBackup.Request(domain: libvirt, uri: connect ?? "qemu:///system", disks: disk, repository: repo,
                                          mode: request.mode, compression: compress.type, dryRun: dryRun,
                                          clusterSize: clusterSize),
                    logger: options.logger, progress: progress?.update)
                // What it did besides the layers: routine notes (a shut-off domain, a checkpoint not needed) are
                // informational like the checkpoint line below; warnings (a job or checkpoints an interrupted run
                // or a crash left, a failed cleanup) are warnings.
                for message in outcome.warnings { warning(message) }
                guard !outcome.grouped, let only = outcome.disks.first else {
                    progress?.finish()
                    report(several: outcome)
                    return 0
                }
                result = only.result
                reason = full || result.index == 0 ? nil : only.reason
                checkpoint = dryRun ? nil : only.checkpoint
                notes = outcome.notes
            } else if let qmp {
                // Its warnings (cleanup in QEMU failed, bits merged back) come through the logger: warning().
                let outcome = try QMPBackup.backup(
                    QMPBackup.Request(socket: qmp, node: node, repository: repo, bitmap: bitmap, mode: request.mode,
                                      compression: compress.type, fleeceDir: fleeceDir, nbdServer: nbdServer, dryRun: dryRun,
                                      clusterSize: clusterSize, takeOverBitmap: takeOverBitmap),
                    logger: options.logger, progress: progress?.update)
                result = outcome.result
                // As offline backups say it: a reason only where auto could have been incremental.
                reason = full || result.index == 0 ? nil : outcome.reason
            } else if let nbd {
                result = try NBDBackup.backup(
                    NBDBackup.Request(uri: nbd, repository: repo, bitmap: bitmap, sourceName: sourceName, mode: request.mode,
                                      compression: compress.type, dryRun: dryRun, clusterSize: clusterSize),
                    logger: options.logger, progress: progress?.update)
            } else {
                result = try BackupEngine.backup(request, logger: options.logger, progress: progress?.update)
            }
            progress?.finish()
            reason = reason ?? result.reason
            if options.json {
                JSONReport.set(JSON.object(object(result, reason: reason, checkpoint: checkpoint, bitmapReset: nbd != nil ? false : nil)))
            } else {
                inform(result, reason: reason)
            }
            if !options.json && !options.quiet {
                for note in notes { standardError("qbackup: note: \(note.replacing("\n", with: " "))\n") }
                if let checkpoint { standardError("qbackup: note: checkpoint '\(checkpoint)'\n") }
            }
            // An export's bitmap belongs to its exporter: say that it was left as it was ("bitmap-reset" in JSON).
            if nbd != nil && bitmap != nil && !result.dryRun && !options.json && !options.quiet {
                standardError("qbackup: note: bitmap '\(result.bitmap)' of the export was not reset; the exporter owns it\n")
            }
            return 0
        }
    }

    /// A backup's JSON object (one disk's, in a run of several).
    func object(_ result: BackupEngine.Result, reason: String?, checkpoint: String?, bitmapReset: Bool? = nil) -> [(String, JSON)] {
        var pairs: [(String, JSON)] = [
            ("kind", .string(result.kind.rawValue)), ("index", .int(Int64(result.index))),
            ("bitmap", .string(result.bitmap)), ("bytes-copied", .uint(result.bytesCopied)),
            ("extents", .int(Int64(result.extents))), ("dry-run", .bool(result.dryRun)),
            ("virtual-size", .uint(result.virtualSize)),
        ]
        if let bitmapReset { pairs.append(("bitmap-reset", .bool(bitmapReset))) }
        if let reason { pairs.append(("reason", .string(reason))) }
        if let checkpoint { pairs.append(("checkpoint", .string(checkpoint))) }
        if let layer = result.layer {
            pairs.insert(("layer", .string(layer.file)), at: 0)
            pairs.append(("mode", .string(layer.mode.rawValue)))
            pairs.append(("file-size", .uint(layer.fileSize)))
            pairs.append(("created", .string(layer.created)))
        }
        return pairs
    }

    /// A backup's human lines (`prefix`: the disk's, in a run of several).
    func inform(_ result: BackupEngine.Result, reason: String?, prefix: String = "") {
        if result.dryRun {
            if let reason { options.inform("\(prefix)would take a full backup: \(reason)\n") }
            options.inform("\(prefix)would take \(result.kind == .full ? "a full" : "an incremental") backup as layer \(result.index): \(humanSize(result.bytesCopied)) in \(result.extents) extent(s)\n")
        } else if let layer = result.layer {
            if let reason { options.inform("\(prefix)taking a full backup: \(reason)\n") }
            options.inform("\(prefix)\(result.kind.rawValue) backup: layer \(result.index) \(layer.file), \(humanSize(result.bytesCopied)) copied in \(result.extents) extent(s), file \(humanSize(layer.fileSize))\n")
        }
    }

    /// Several disks of a libvirt domain (DIR/TARGET each): JSON `{"disks": [...]}`, one object
    /// per disk as one disk's backup reports it plus its `disk` target and `repository`; human
    /// output, each disk's lines prefixed with its target.
    func report(several outcome: LibvirtBackup.Outcome) {
        let reasonOf = { (disk: LibvirtBackup.DiskOutcome) -> String? in full || disk.result.index == 0 ? nil : disk.reason }
        if options.json {
            let disks = outcome.disks.map { disk -> JSON in
                let names: [(String, JSON)] = [("disk", .string(disk.target)), ("repository", .string(disk.repository))]
                return JSON.object(names + object(disk.result, reason: reasonOf(disk), checkpoint: dryRun ? nil : disk.checkpoint))
            }
            JSONReport.set(JSON.object([("disks", .array(disks))]))
            return
        }
        for disk in outcome.disks { inform(disk.result, reason: reasonOf(disk), prefix: "\(disk.target): ") }
        guard !options.quiet else { return }
        for note in outcome.notes { standardError("qbackup: note: \(note.replacing("\n", with: " "))\n") }
        if !dryRun {
            for disk in outcome.disks {
                if let checkpoint = disk.checkpoint { standardError("qbackup: note: \(disk.target): checkpoint '\(checkpoint)'\n") }
            }
        }
    }
}

extension CommandLine {
    /// Whether every argument the process was given is valid UTF-8.
    static var argumentsAreValidUTF8: Bool {
        (0..<Int(argc)).allSatisfy { i in unsafeArgv[i].map { String(validatingCString: $0) != nil } ?? true }
    }
}
