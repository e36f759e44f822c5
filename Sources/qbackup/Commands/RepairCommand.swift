import ArgumentParser
import BackupChain

/// `qbackup repair DIR [--yes] [--source IMAGE]` — rebuild a lost or unreadable manifest.
struct RepairCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "repair",
        abstract: "Rebuild a repository's lost or unreadable manifest from its layer files.",
        discussion: """
            From the sidecars beside the layers (LAYER.qcow2.json) the manifest comes back exactly: \
            indices, repository id, bitmap and source. Without sidecars (a repository of an older \
            qbackup) it is rebuilt from the backing chains of the full-*/incr-* files: indices \
            numbered anew, checksums computed, a new bitmap name (so the next backup is full), and \
            --source names the disk. Every layer file is hashed and its backing link read; one that \
            does not fit (damaged, missing, a symbolic link, an unreadable sidecar, a broken backing \
            link) is left out with the reason and never deleted; when the newest layer is left out, \
            the bitmap it cleared no longer covers the chain, so the manifest names a new bitmap and \
            the next backup is a full one. A readable manifest is never shortened: repair only adds \
            the layers it lacks. Shows what it found; writes only with --yes, sidecars first and the \
            manifest last, so a crash leaves the folder as it was or repaired (run repair again).

            Exit status: 0 rebuilt, or shown without --yes, or nothing to repair; 1 no layer files \
            to rebuild from, a merge to finish first ('qbackup merge'), or a readable manifest that \
            would lose a layer; 1 also when --source is needed and missing; 75 the repository is \
            locked by another qbackup.
            """)

    @Argument(help: "The repository folder.", completion: .directory) var repository: String

    @Flag(name: .long, help: "Write the rebuilt manifest.") var yes = false

    @Option(name: .long, help: "The disk the repository backs up (needed only when the layers have no sidecars).", completion: .file())
    var source: String?

    @OptionGroup var options: GlobalOptions

    func run() throws {
        try ExitStatus.run(json: options.json) {
            let result = try RepairEngine.repair(RepairEngine.Request(repository: repository, write: yes, source: source),
                                                 logger: options.logger)
            let layers = result.manifest?.layers ?? []
            if options.json {
                var pairs: [(String, JSON)] = [
                    ("basis", .string(result.basis.rawValue)),
                    ("written", .bool(result.written)), ("unchanged", .bool(result.unchanged)),
                    ("manifest-problem", result.manifestProblem.map(JSON.string) ?? .null),
                    ("id", result.manifest.map { .string($0.id) } ?? .null),
                    ("layers", .array(layers.map { l in
                        .object([("index", .int(Int64(l.index))), ("file", .string(l.file)), ("kind", .string(l.kind.rawValue)),
                                 ("created", .string(l.created)), ("file-size", .uint(l.fileSize))])
                    })),
                    ("bitmap-note", result.bitmapNote.map(JSON.string) ?? .null),
                    ("left-out", .array(result.leftOut.map { .object([("file", .string($0.file)), ("reason", .string($0.reason))]) })),
                ]
                if result.manifest == nil { pairs.append(("found", .bool(false))) }
                JSONReport.set(JSON.object(pairs))
            } else {
                if let problem = result.manifestProblem { emit("the manifest cannot be read: \(problem)\n") }
                for (file, reason) in result.leftOut { emit("left out \(file): \(reason)\n") }
                guard let m = result.manifest else {
                    emit("no layer files found in \(repository): nothing to rebuild\n")
                    return 1
                }
                emit("rebuilt from the \(result.basis == .sidecars ? "layer sidecars" : result.basis == .manifest ? "readable manifest" : "backing chains of the layer files"): repository \(m.id), disk \(m.source.summary), bitmap \(m.bitmap ?? "none"), \(layers.count) layer(s)\n")
                for l in layers { emit("  \(l.index)  \(l.kind.rawValue.padding(12))\(l.created)  \(l.file)\n") }
                if let note = result.bitmapNote { emit("note: \(note)\n") }
                if result.unchanged {
                    emit("the manifest already says exactly this: nothing to repair\n")
                } else if result.written {
                    emit("manifest written\n")
                } else {
                    emit("nothing written: run again with --yes to write this manifest\n")
                }
            }
            return result.manifest == nil ? 1 : 0
        }
    }
}
