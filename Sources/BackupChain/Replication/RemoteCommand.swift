import Dispatch
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#endif

/// A child process (ssh) started with `posix_spawnp`: its stdin a pipe this process writes
/// the stream into (or /dev/null), its stdout and stderr drained by threads into bounded
/// buffers, its exit status reaped. The child gets default signal handling and an empty mask
/// (`send` ignores SIGPIPE, which a child would otherwise inherit).
final class RemoteCommand: @unchecked Sendable {
    struct Output: Sendable {
        var status: Int32
        var stdout: [UInt8]
        var stderr: [UInt8]
    }

    /// The most bytes kept of the child's stdout (a listing is at most a manifest) and stderr.
    static let maxOutput = ReplicaListing.maxBytes
    static let maxErrors = 1 << 20

    /// The write end of the child's stdin (-1 when it reads /dev/null or once closed).
    private(set) var input: Int32
    private let pid: pid_t
    private var stdout: [UInt8] = []
    private var stderr: [UInt8] = []
    private let drained = DispatchGroup()

    private init(_ arguments: [String], withInput: Bool) throws {
        let inPipe = withInput ? try Self.makePipe() : nil
        let outPipe = try Self.makePipe()
        let errPipe = try Self.makePipe()
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let inPipe {
            posix_spawn_file_actions_adddup2(&actions, inPipe.0, 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        posix_spawn_file_actions_adddup2(&actions, outPipe.1, 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe.1, 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for arg in argv { free(arg) } }
        var child = pid_t()
        let rc = posix_spawnp(&child, arguments[0], &actions, &attributes, argv, environ)
        if let inPipe { close(inPipe.0) }
        close(outPipe.1)
        close(errPipe.1)
        guard rc == 0 else {
            if let inPipe { close(inPipe.1) }
            close(outPipe.0)
            close(errPipe.0)
            throw ChainError(.io, "cannot run \(arguments[0]): \(String(cString: strerror(rc)))")
        }
        pid = child
        input = inPipe?.1 ?? -1
        drain(outPipe.0, limit: Self.maxOutput) { self.stdout = $0 }
        drain(errPipe.0, limit: Self.maxErrors) { self.stderr = $0 }
    }

    /// A pipe (read end, write end), both close-on-exec (the child gets its ends by dup2).
    static func makePipe() throws -> (Int32, Int32) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw ChainError(.io, "cannot make a pipe: \(String(cString: strerror(errno)))") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        return (fds[0], fds[1])
    }

    /// Reads `fd` to its end on another thread, keeping at most `limit` bytes.
    private func drain(_ fd: Int32, limit: Int, into store: @escaping @Sendable ([UInt8]) -> Void) {
        drained.enter()
        DispatchQueue.global().async {
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                if bytes.count < limit { bytes += chunk[0..<min(n, limit - bytes.count)] }
            }
            close(fd)
            store(bytes)
            self.drained.leave()
        }
    }

    /// Starts `arguments` with a pipe on its stdin (`input`); `finish()` waits for it.
    static func start(_ arguments: [String]) throws -> RemoteCommand { try RemoteCommand(arguments, withInput: true) }

    /// Runs `arguments` to its end with stdin from /dev/null.
    static func run(_ arguments: [String], input: Never?) throws -> Output {
        try RemoteCommand(arguments, withInput: false).finish()
    }

    /// Closes stdin, waits for the child to exit and its output to end.
    func finish() -> Output {
        if input >= 0 {
            close(input)
            input = -1
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        drained.wait()
        let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Output(status: code, stdout: stdout, stderr: stderr)
    }
}

/// Splitting a command line into words as a shell does for `--ssh-command` (rsync's `-e`):
/// blanks separate words; single quotes, double quotes and backslashes quote.
enum ShellWords {
    static func split(_ text: String) throws -> [String] {
        var words: [String] = []
        var word = ""
        var inWord = false
        var quote: Character?
        var escaped = false
        for c in text {
            if escaped {
                word.append(c)
                escaped = false
                continue
            }
            if let q = quote {
                if c == q {
                    quote = nil
                } else if c == "\\" && q == "\"" {
                    escaped = true
                } else {
                    word.append(c)
                }
                continue
            }
            switch c {
            case " ", "\t", "\n":
                if inWord { words.append(word) }
                word = ""
                inWord = false
            case "'", "\"":
                quote = c
                inWord = true
            case "\\":
                escaped = true
                inWord = true
            default:
                word.append(c)
                inWord = true
            }
        }
        guard quote == nil, !escaped else { throw ChainError(.invalidArgument, "--ssh-command has an unterminated quote") }
        if inWord { words.append(word) }
        return words
    }

    /// `word` in single quotes for the remote shell (a quote inside as '\'').
    static func quote(_ word: String) -> String {
        "'" + word.replacing("'", with: "'\\''") + "'"
    }
}
