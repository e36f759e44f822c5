import ArgumentParser
import BackupChain
import QCowImage

/// `qbackup list DIR` — the layers of a repository.
struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List the layers of a backup repository: index, file, kind, time, data held, file size.")

    @Argument(help: "The repository folder.", completion: .directory) var repository: String

    @Option(name: .long, help: ArgumentHelp("How long to wait for a backup or merge that holds the repository to finish (seconds).",
                                            valueName: "seconds"))
    var wait: Double = 5

    @OptionGroup var options: GlobalOptions

    func validate() throws {
        if !(wait >= 0 && wait <= 86400) { throw ValidationError("--wait must be 0 to 86400 seconds") }
    }

    func run() throws {
        try ExitStatus.run(json: options.json) {
            // The top folder of a libvirt backup of several disks is no repository: each disk's is listed.
            if let disks = try BackupRepository.groupDisks(repository) {
                let repos = try disks.map { try BackupRepository(path: "\(repository)/\($0)", exclusive: false, wait: wait) }
                if options.json {
                    let items: [JSON] = zip(disks, repos).map { disk, repo in
                        .object([("disk", .string(disk)), ("repository", .string(repo.path))] + Self.listing(repo))
                    }
                    JSONReport.set(JSON.object([("disks", .array(items))]))
                } else {
                    emit("\(repository) holds the repositories of \(disks.count) disk(s) of a libvirt backup\(disks.isEmpty ? "" : ":")\n")
                    for (disk, repo) in zip(disks, repos) {
                        emit("\n\(disk): ")
                        Self.show(repo)
                    }
                }
                return 0
            }
            let repo = try BackupRepository(path: repository, exclusive: false, allowMissing: true, wait: wait)
            if options.json {
                JSONReport.set(JSON.object(Self.listing(repo)))
            } else {
                Self.show(repo)
            }
            return 0
        }
    }

    /// The keys of one repository's list JSON.
    static func listing(_ repo: BackupRepository) -> [(String, JSON)] {
        let layers = repo.manifest?.layers ?? []
        let items: [JSON] = layers.map { l in
            var pairs: [(String, JSON)] = [
                ("index", .int(Int64(l.index))), ("file", .string(l.file)), ("kind", .string(l.kind.rawValue)),
                ("mode", .string(l.mode.rawValue)), ("created", .string(l.created)),
                ("bytes-copied", .uint(l.bytesCopied)), ("file-size", .uint(l.fileSize)),
                ("virtual-size", .uint(l.virtualSize)), ("sha256", .string(l.sha256)),
            ]
            if let checkpoint = l.checkpoint { pairs.append(("checkpoint", .string(checkpoint))) }
            if let damaged = l.damaged { pairs.append(("damaged", .string(damaged))) }
            // What `send --have` needs to send only the chunks of a file that a merge changed.
            if let chunks = l.chunks, let size = l.chunkSize {
                pairs += [("chunk-size", .int(Int64(size))), ("chunks", .array(chunks.map(JSON.string)))]
            }
            return .object(pairs)
        }
        var top: [(String, JSON)] = [("layers", .array(items))]
        if let m = repo.manifest {
            let s = m.source
            let source: [(String, JSON)] = [("kind", .string(s.kind.rawValue))]
                + [("path", s.path), ("domain-uuid", s.domainUUID), ("disk", s.disk), ("uri", s.uri), ("name", s.name)]
                .compactMap { key, value in value.map { (key, JSON.string($0)) } }
            top += [("id", .string(m.id)), ("version", .int(Int64(m.version))),
                    ("bitmap", m.bitmap.map(JSON.string) ?? .null),
                    ("replica-of", m.replicaOf.map(JSON.string) ?? .null), ("source", .object(source)),
                    ("virtual-size", .uint(m.virtualSize))]
        } else {
            // No backup yet: the same keys, so a script reads one shape.
            top += ["id", "version", "bitmap", "replica-of", "source", "virtual-size"].map { ($0, JSON.null) }
        }
        return top
    }

    /// One repository, as `list DIR` shows it.
    static func show(_ repo: BackupRepository) {
        let layers = repo.manifest?.layers ?? []
        if let m = repo.manifest {
            emit("repository \(repo.path): disk \(m.source.summary), bitmap \(m.bitmap ?? "none"), \(layers.count) layer(s)\n")
            // libvirt layers also name the checkpoint their changes are tracked since.
            let checkpoints = layers.contains { $0.checkpoint != nil }
            emit("INDEX".padding(7) + "KIND".padding(13) + "MODE".padding(9) + "CREATED (UTC)".padding(22)
                 + "DATA".padding(12) + "SIZE".padding(12) + (checkpoints ? "FILE".padding(30) + "CHECKPOINT\n" : "FILE\n"))
            for l in layers {
                emit(String(l.index).padding(7) + l.kind.rawValue.padding(13) + l.mode.rawValue.padding(9)
                     + l.created.padding(22) + humanSize(l.bytesCopied).padding(12) + humanSize(l.fileSize).padding(12)
                     + (checkpoints ? l.file.padding(30) + (l.checkpoint ?? "-") + "\n" : l.file + "\n"))
            }
        } else {
            emit("repository \(repo.path) holds no backup yet\n")
        }
    }
}
