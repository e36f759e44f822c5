import ArgumentParser
import BackupChain
import FoundationEssentials
import Glibc
import Logging

/// `qbackup send DIR [--after INDEX | --have FILE] [--compress lz4|none]` — a replication stream to stdout.
struct SendCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send",
        abstract: "Write a repository's points as a replication stream to stdout (for 'qbackup receive').",
        discussion: """
            Sends every point, the points after --after INDEX, or what a destination lacks given its \
            'qbackup list --output json' in --have FILE (points are known by index and sha256; after a \
            merge here, a point whose file changed goes as a fold record with only the 4 MiB chunks \
            that differ from the destination's file). Layer \
            files go as they are on disk, sparsely (holes are not sent), lz4-framed unless \
            --compress none; every record carries a CRC-32, every layer its sha256 \
            (docs/replication-stream.md). The repository is held with the shared lock while it is \
            sent, so no merge changes it meanwhile. stdout carries the stream: it must not be a terminal.
            """)

    @Argument(help: "The repository folder.", completion: .directory) var repository: String

    @Option(name: .long, help: ArgumentHelp("Send only the points after this index (the destination holds it and those before).",
                                            valueName: "index"))
    var after: Int?

    @Option(name: .long, help: ArgumentHelp("The destination's 'qbackup list --output json': send what it lacks.", valueName: "file"),
            completion: .file())
    var have: String?

    @Option(name: .long, help: "Compress the stream's data: lz4 or none.") var compress: ReplicationStream.Compression = .lz4

    @Option(name: .long, help: ArgumentHelp("How long to wait for a backup or merge that holds the repository to finish (seconds).",
                                            valueName: "seconds"))
    var wait: Double = 5

    @Flag(name: .long, help: "Log debug details to stderr.") var verbose = false
    @OptionGroup var progressOptions: ProgressOptions

    func validate() throws {
        if after != nil && have != nil { throw ValidationError("--after and --have exclude each other") }
        if !(wait >= 0 && wait <= 86400) { throw ValidationError("--wait must be 0 to 86400 seconds") }
        if isatty(STDOUT_FILENO) != 0 {
            throw ValidationError("stdout is a terminal; pipe the stream into 'qbackup receive DIR' (or a file)")
        }
    }

    func run() throws {
        // A reader that goes away is an error line, not a silent death by SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
        try ExitStatus.run {
            let listing = try have.map { try ReplicaListing(validating: try Self.readListing($0), what: $0) }
            let progress = progressOptions.reporter("send")
            var logger = Logger(label: "qbackup") { _ in ReportLogHandler() }
            logger.logLevel = verbose ? .debug : .warning
            _ = try ReplicationSender.send(
                ReplicationSender.Request(repository: repository, after: after, have: listing, compression: compress, wait: wait),
                to: DescriptorStream(fd: STDOUT_FILENO, name: "stdout"), logger: logger, progress: progress?.update)
            progress?.finish()
            return 0
        }
    }

    /// The --have file, bounded before it is read.
    static func readListing(_ path: String) throws -> Data {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { throw ChainError(.io, "cannot open: \(String(cString: strerror(errno)))", path: path) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno == EAGAIN { usleep(1000); continue }
            guard n >= 0 else { throw ChainError(.io, "cannot read: \(String(cString: strerror(errno)))", path: path) }
            if n == 0 { break }
            bytes += chunk[0..<n]
            if bytes.count > ReplicaListing.maxBytes {
                throw ChainError(.invalidFormat, "more than \(ReplicaListing.maxBytes) bytes; not a listing", path: path)
            }
        }
        return Data(bytes)
    }
}

extension ReplicationStream.Compression: ExpressibleByArgument {}
