import ArgumentParser
import BackupChain
import Glibc

/// `qbackup replicate DIR DEST [--ssh-command CMD] [--remote-qbackup PATH]` — bring a replica up to DIR.
struct ReplicateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replicate",
        abstract: "Bring a replica (a folder, or ssh://[user@]host[:port]/path) up to a repository.",
        discussion: """
            Learns what DEST holds ('qbackup list --output json PATH', over ssh when DEST is \
            ssh://; a folder that does not exist holds nothing), then sends what it lacks into \
            'qbackup receive PATH' there. Every layer is checked (sha256) and flushed at the other \
            end before it is recorded; a cut connection leaves the replica as it was plus the \
            complete layers, and the next run sends the rest. --ssh-command is taken as rsync's -e \
            (keys, ports, options); --remote-qbackup names the binary on the other side. Offsite, \
            nightly after the backup:

              qbackup backup /var/lib/libvirt/images/vm.qcow2 --repo /backup/vm && qbackup replicate /backup/vm ssh://backup-host/srv/vm
            """)

    @Argument(help: "The source repository folder.", completion: .directory) var repository: String
    @Argument(help: "The replica: a folder, or ssh://[user@]host[:port]/path.") var destination: String

    @Option(name: .long, help: ArgumentHelp("The ssh client and its options, as rsync's -e (default: ssh).", valueName: "command"))
    var sshCommand: String = "ssh"

    @Option(name: .customLong("remote-qbackup"), help: ArgumentHelp("The qbackup binary on the other side (default: qbackup).", valueName: "path"))
    var remoteQBackup: String = "qbackup"

    @Option(name: .long, help: "Compress the stream's data: lz4 or none.") var compress: ReplicationStream.Compression = .lz4

    @Option(name: .long, help: ArgumentHelp("How long to wait for a backup or merge that holds a repository to finish (seconds).",
                                            valueName: "seconds"))
    var wait: Double = 5

    @OptionGroup var options: GlobalOptions
    @OptionGroup var progressOptions: ProgressOptions

    func validate() throws {
        if !(wait >= 0 && wait <= 86400) { throw ValidationError("--wait must be 0 to 86400 seconds") }
    }

    func run() throws {
        // A connection that breaks is an error line, not a silent death by SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
        try ExitStatus.run(json: options.json) {
            let target = try Replicator.Destination(parsing: destination)
            let progress = progressOptions.reporter("replicate")
            let result = try Replicator.replicate(
                Replicator.Request(repository: repository, destination: target, sshCommand: sshCommand, remoteQBackup: remoteQBackup,
                                   compression: compress, wait: wait),
                logger: options.logger, progress: progress?.update)
            progress?.finish()
            if options.json {
                JSONReport.set(JSON.object([
                    ("source", .string(repository)), ("destination", .string(target.description)),
                    ("layers-sent", .array(result.layers.map { .int(Int64($0)) })),
                    ("folds-sent", .array(result.folds.map { .int(Int64($0)) })),
                    ("file-bytes", .uint(result.fileBytes)), ("stream-bytes", .uint(result.streamBytes)),
                    ("milliseconds", .uint(UInt64(result.seconds * 1000))), ("up-to-date", .bool(result.layers.isEmpty)),
                ]))
            } else if result.layers.isEmpty {
                options.inform("\(target) is up to date\n")
            } else {
                options.inform("replicated \(result.layers.count) layer(s), \(humanSize(result.fileBytes)) (\(humanSize(result.streamBytes)) sent) to \(target) in \(String(printf: "%.1f", result.seconds)) s\n")
            }
            return 0
        }
    }
}
