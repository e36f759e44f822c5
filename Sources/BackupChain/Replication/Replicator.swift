import Dispatch
import FoundationEssentials
import Logging
import QCowImage

#if canImport(Glibc)
import Glibc
#endif

/// `qbackup replicate DIR DEST`: brings a replica up to its source. It learns what DEST holds
/// (its `list --output json`), sends what it lacks, and has DEST receive it — in this process
/// for a local folder, or over ssh (`ssh [user@]host qbackup list --output json PATH`, then
/// `send --have` piped into `ssh host qbackup receive PATH`).
public enum Replicator {
    /// Where the replica is.
    public enum Destination: Equatable, Sendable, CustomStringConvertible {
        case folder(String)
        case ssh(user: String?, host: String, port: Int?, path: String)

        /// A folder, or `ssh://[user@]host[:port]/path`.
        public init(parsing text: String) throws {
            guard text.hasPrefix("ssh://") else {
                guard !text.isEmpty else { throw ChainError(.invalidArgument, "the destination is empty") }
                self = .folder(text)
                return
            }
            let rest = text.dropFirst("ssh://".count)
            guard let slash = rest.firstIndex(of: "/") else {
                throw ChainError(.invalidArgument, "\(text): an ssh destination needs a path: ssh://[user@]host[:port]/path")
            }
            var authority = String(rest[..<slash])
            let path = String(rest[slash...])
            var user: String?
            if let at = authority.lastIndex(of: "@") {
                user = String(authority[..<at])
                authority = String(authority[authority.index(after: at)...])
            }
            var port: Int?
            if let colon = authority.lastIndex(of: ":"), !authority.hasSuffix("]") {
                guard let p = Int(authority[authority.index(after: colon)...]), p >= 1, p <= 65535 else {
                    throw ChainError(.invalidArgument, "\(text): the port is not a number from 1 to 65535")
                }
                port = p
                authority = String(authority[..<colon])
            }
            if authority.hasPrefix("[") && authority.hasSuffix("]") { authority = String(authority.dropFirst().dropLast()) }
            let plain = { (s: String) in !s.isEmpty && !s.hasPrefix("-") && !s.unicodeScalars.contains { $0.value <= 0x20 || $0.value == 0x7f } }
            guard plain(authority), user.map(plain) ?? true, path.count > 1, !path.unicodeScalars.contains(where: { $0.value < 0x20 }) else {
                throw ChainError(.invalidArgument, "\(text): not a valid ssh://[user@]host[:port]/path")
            }
            self = .ssh(user: user, host: authority, port: port, path: path)
        }

        public var description: String {
            switch self {
            case .folder(let path): return path
            case let .ssh(user, host, port, path):
                return "ssh://\(user.map { "\($0)@" } ?? "")\(host)\(port.map { ":\($0)" } ?? "")\(path)"
            }
        }
    }

    public struct Request: Sendable {
        public var repository: String
        public var destination: Destination
        /// The ssh client and its options, as rsync's `-e` (split into words like a shell).
        public var sshCommand: String
        /// The qbackup binary on the other side.
        public var remoteQBackup: String
        public var compression: ReplicationStream.Compression
        public var wait: Double
        public init(repository: String, destination: Destination, sshCommand: String = "ssh", remoteQBackup: String = "qbackup",
                    compression: ReplicationStream.Compression = .lz4, wait: Double = 0) {
            self.repository = repository
            self.destination = destination
            self.sshCommand = sshCommand
            self.remoteQBackup = remoteQBackup
            self.compression = compression
            self.wait = wait
        }
    }

    public struct Result: Sendable {
        /// The indices of the layers sent (empty: the replica was up to date).
        public var layers: [Int]
        /// Those sent as folds (merges at the source).
        public var folds: [Int] = []
        public var fileBytes: UInt64
        /// Bytes of the stream (over ssh: what went into the connection).
        public var streamBytes: UInt64
        public var seconds: Double
    }

    /// Replicates; `progress(done, total)` counts layer bytes sent.
    public static func replicate(_ request: Request, logger: Logger = Logger(label: "qbackup.replicate"),
                                 progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        let started = DispatchTime.now()
        func elapsed() -> Double { Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9 }
        let listing: ReplicaListing
        switch request.destination {
        case .folder(let path):
            listing = try localListing(path, wait: request.wait)
        case .ssh(_, _, _, let path):
            let out = try RemoteCommand.run(ssh(request, [request.remoteQBackup, "list", "--output", "json", path]), input: nil)
            guard out.status == 0 else { throw remoteFailure(request, "list", out) }
            listing = try ReplicaListing(validating: Data(out.stdout), what: "\(request.destination): its listing")
        }
        logger.debug("destination holds", metadata: ["points": "\(listing.points.map(\.index))"])
        let send = ReplicationSender.Request(repository: request.repository, have: listing, compression: request.compression,
                                             wait: request.wait)
        switch request.destination {
        case .folder(let path):
            let sent = try pipeline(send, logger: logger, progress: progress) { input in
                _ = try ReplicationReceiver.receive(repository: path, from: input, wait: request.wait, logger: logger)
            }
            return Result(layers: sent.layers, folds: sent.folds, fileBytes: sent.fileBytes, streamBytes: sent.streamBytes,
                          seconds: elapsed())
        case .ssh(_, _, _, let path):
            let child = try RemoteCommand.start(ssh(request, [request.remoteQBackup, "receive", path, "--quiet", "--no-progress"]))
            let sent: ReplicationSender.Result
            do {
                sent = try ReplicationSender.send(send, to: DescriptorStream(fd: child.input, name: "ssh"), logger: logger,
                                                  progress: progress)
            } catch {
                let out = child.finish()
                // The other side's refusal explains a broken pipe better than the pipe does; any
                // other failure is the sender's own (the other side then only saw the stream end).
                if out.status != 0, let broken = error as? ChainError, broken.message.hasPrefix(DescriptorStream.writeFailure) {
                    throw remoteFailure(request, "receive", out)
                }
                throw error
            }
            let out = child.finish()
            guard out.status == 0 else { throw remoteFailure(request, "receive", out) }
            return Result(layers: sent.layers, folds: sent.folds, fileBytes: sent.fileBytes, streamBytes: sent.streamBytes,
                          seconds: elapsed())
        }
    }

    /// A local destination's listing: as `list --output json` would print it.
    static func localListing(_ path: String, wait: Double) throws -> ReplicaListing {
        let repo = try BackupRepository(path: path, exclusive: false, allowMissing: true, wait: wait, createLock: false)
        guard let m = repo.manifest else { return ReplicaListing(id: nil, replicaOf: nil, points: []) }
        return ReplicaListing(m)
    }

    /// Sends into a pipe whose other end `receive` reads on another thread; the receiver's
    /// error comes first (a sender that lost its reader only says the pipe broke).
    static func pipeline(_ send: ReplicationSender.Request, logger: Logger, progress: ((UInt64, UInt64) -> Void)?,
                         receive: @escaping @Sendable (StreamInput) throws -> Void) throws -> ReplicationSender.Result {
        let (readEnd, writeEnd) = try RemoteCommand.makePipe()
        final class Outcome: @unchecked Sendable { var error: Error? }
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            do { try receive(DescriptorStream(fd: readEnd, name: "the pipe")) } catch { outcome.error = error }
            close(readEnd)
            done.signal()
        }
        let sent: Swift.Result<ReplicationSender.Result, Error> = Swift.Result {
            try ReplicationSender.send(send, to: DescriptorStream(fd: writeEnd, name: "the pipe"), logger: logger, progress: progress)
        }
        close(writeEnd)
        done.wait()
        // A receiver that saw the stream end early only says so: the sender's error is the cause.
        if case .failure(let error) = sent, let cut = outcome.error as? ChainError, cut.errorCode == .truncated { throw error }
        if let error = outcome.error { throw error }
        return try sent.get()
    }

    /// The ssh command line for `remote` (each word quoted for the remote shell).
    static func ssh(_ request: Request, _ remote: [String]) throws -> [String] {
        guard case let .ssh(user, host, port, _) = request.destination else { return [] }
        var words = try ShellWords.split(request.sshCommand)
        guard !words.isEmpty else { throw ChainError(.invalidArgument, "--ssh-command is empty") }
        if let port { words += ["-p", String(port)] }
        words.append(user.map { "\($0)@\(host)" } ?? host)
        words.append(remote.map(ShellWords.quote).joined(separator: " "))
        return words
    }

    static func remoteFailure(_ request: Request, _ what: String, _ out: RemoteCommand.Output) -> ChainError {
        let text = String(decoding: out.stderr, as: UTF8.self)
        let lines = text.split(separator: "\n").map(String.init)
        let reason = lines.first { $0.hasPrefix("qbackup: error: ") }.map { String($0.dropFirst("qbackup: error: ".count)) }
            ?? lines.last ?? "exited with status \(out.status)"
        return ChainError(.io, "\(request.destination): remote '\(what)' failed (status \(out.status)): \(reason)")
    }
}
