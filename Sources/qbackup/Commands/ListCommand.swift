import ArgumentParser
import BackupChain
import QCowImage

/// `qbackup list DIR` — the layers of a repository.
struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List the layers of a backup repository: index, file, kind, time, bytes copied, file size.")

    @Argument(help: "The repository folder.") var repository: String

    @Option(name: .long, help: ArgumentHelp("How long to wait for a backup or merge that holds the repository to finish (seconds).",
                                            valueName: "seconds"))
    var wait: Double = 5

    @OptionGroup var options: GlobalOptions

    func validate() throws {
        if !(wait >= 0 && wait <= 86400) { throw ValidationError("--wait must be 0 to 86400 seconds") }
    }

    func run() throws {
        try ExitStatus.run {
            let repo = try BackupRepository(path: repository, exclusive: false, wait: wait)
            let layers = repo.manifest?.layers ?? []
            if options.json {
                let items: [JSON] = layers.enumerated().map { i, l in
                    .object([("index", .int(Int64(i))), ("file", .string(l.file)), ("kind", .string(l.kind.rawValue)),
                             ("created", .string(l.created)), ("bytes-copied", .uint(l.bytesCopied)),
                             ("file-size", .uint(l.fileSize)), ("virtual-size", .uint(l.virtualSize))])
                }
                var top: [(String, JSON)] = [("layers", .array(items))]
                if let m = repo.manifest {
                    top += [("id", .string(m.id)), ("bitmap", .string(m.bitmap)), ("source", .string(m.source)),
                            ("virtual-size", .uint(m.virtualSize))]
                }
                emit(JSON.object(top).pretty() + "\n")
            } else if let m = repo.manifest {
                emit("repository \(repository): disk \(m.source), bitmap \(m.bitmap), \(layers.count) layer(s)\n")
                emit("INDEX".padding(7) + "KIND".padding(13) + "CREATED (UTC)".padding(22) + "COPIED".padding(12)
                     + "SIZE".padding(12) + "FILE\n")
                for (i, l) in layers.enumerated() {
                    emit(String(i).padding(7) + l.kind.rawValue.padding(13) + l.created.padding(22)
                         + humanSize(l.bytesCopied).padding(12) + humanSize(l.fileSize).padding(12) + l.file + "\n")
                }
            } else {
                emit("repository \(repository) holds no backup yet\n")
            }
            return 0
        }
    }
}
