import ArgumentParser
import BackupChain
import Glibc

/// `qbackup receive DIR` — a replication stream from stdin into a replica.
struct ReceiveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive",
        abstract: "Read a replication stream ('qbackup send') from stdin into a replica repository.",
        discussion: """
            DIR is a new folder or a replica of the same repository holding exactly the points the \
            stream continues from; anything else is refused before anything is written. Each layer is \
            received all or nothing: written under a temporary name, its sha256 checked, flushed, \
            renamed, then recorded in the manifest. A fold (a merge at the source) is built from the \
            replica's own file and the chunks sent, checked the same way, and switched in atomically \
            (an interrupted switch is finished by the next command that opens the replica). A cut or \
            damaged stream leaves the replica as it was plus the complete layers and folds before the \
            damage. A replica works with list, verify and \
            restore; backup and merge refuse it (it follows its source's retention).
            """)

    @Argument(help: "The replica's folder.", completion: .directory) var repository: String

    @Option(name: .long, help: ArgumentHelp("How long to wait for another qbackup that holds the replica to finish (seconds).",
                                            valueName: "seconds"))
    var wait: Double = 5

    @OptionGroup var options: GlobalOptions
    @OptionGroup var progressOptions: ProgressOptions

    func validate() throws {
        if !(wait >= 0 && wait <= 86400) { throw ValidationError("--wait must be 0 to 86400 seconds") }
        if isatty(STDIN_FILENO) != 0 { throw ValidationError("stdin is a terminal; pipe 'qbackup send DIR' into it") }
    }

    func run() throws {
        try ExitStatus.run(json: options.json) {
            let progress = progressOptions.reporter("receive")
            let result = try ReplicationReceiver.receive(repository: repository, from: DescriptorStream(fd: STDIN_FILENO, name: "stdin"),
                                                         wait: wait, logger: options.logger, progress: progress?.update)
            progress?.finish()
            if options.json {
                JSONReport.set(JSON.object([
                    ("replica", .string(repository)), ("replica-of", .string(result.replicaOf)),
                    ("layers-received", .array(result.layers.map { .int(Int64($0)) })),
                    ("file-bytes", .uint(result.fileBytes)), ("stream-bytes", .uint(result.streamBytes)),
                ]))
            } else {
                options.inform("received \(result.layers.count) layer(s), \(humanSize(result.fileBytes)) (\(humanSize(result.streamBytes)) streamed) into \(repository), a replica of \(result.replicaOf)\n")
            }
            return 0
        }
    }
}
