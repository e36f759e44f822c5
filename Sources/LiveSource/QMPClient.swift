import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A QMP client over a unix socket: the greeting and `qmp_capabilities`,
/// commands with ids, events queued while a reply is awaited, a timeout on
/// every wait, and QEMU's error class and description in every failure.
///
/// A QMP monitor serves one client at a time; a second client connects but
/// gets no greeting until the first leaves, so a missing greeting is reported
/// as a busy monitor.
public final class QMPClient {
    /// One asynchronous event QEMU sent (`BLOCK_JOB_CANCELLED`, `BLOCK_EXPORT_DELETED`, …).
    public struct Event {
        public var name: String
        public var data: [String: Any]
    }

    public let path: String
    /// How long one command or event wait may take.
    public var timeout: TimeInterval
    /// QEMU's version from the greeting (`major.minor.micro`).
    public private(set) var version = ""

    private var fd: Int32 = -1
    private var buffer: [UInt8] = []
    private var events: [Event] = []
    private var nextID = 0
    /// Largest JSON message accepted (query-named-block-nodes of a big VM is far below this).
    static let maxMessage = 64 << 20

    /// Connects to the monitor at `path`, reads the greeting and negotiates capabilities.
    public init(path: String, timeout: TimeInterval = 30) throws {
        self.path = path
        self.timeout = timeout
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw LiveError(.io, "\(path): cannot create a socket: \(String(cString: strerror(errno)))") }
        do {
            try connectSocket()
            let greeting: [String: Any]
            do {
                greeting = try readMessage(deadline: Date().addingTimeInterval(min(timeout, 10)), what: "the QMP greeting")
            } catch let error as LiveError where error.message.contains("did not send") {
                throw LiveError(.locked, "\(path): QEMU sent no QMP greeting: the monitor is busy with another client (give qbackup a -qmp socket of its own)")
            }
            guard let qmp = greeting["QMP"] as? [String: Any] else {
                throw LiveError(.invalidFormat, "\(path): not a QMP monitor (no greeting)")
            }
            if let v = (qmp["version"] as? [String: Any])?["qemu"] as? [String: Any],
               let major = v["major"] as? Int, let minor = v["minor"] as? Int, let micro = v["micro"] as? Int {
                version = "\(major).\(minor).\(micro)"
            }
            _ = try execute("qmp_capabilities")
        } catch {
            Glibc.close(fd)
            fd = -1
            throw error
        }
    }

    deinit { close() }

    public func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    private func connectSocket() throws {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { throw LiveError(.invalidArgument, "\(path): socket path is longer than \(capacity - 1) bytes") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard result == 0 else {
            throw LiveError(.io, "\(path): cannot connect to the QMP socket: \(String(cString: strerror(errno)))")
        }
    }

    // MARK: - Commands

    /// Runs `command` and returns its `return` value; a QMP error throws with QEMU's class and description.
    @discardableResult
    public func execute(_ command: String, _ arguments: [String: Any]? = nil, timeout: TimeInterval? = nil) throws -> Any {
        guard fd >= 0 else { throw LiveError(.io, "\(path): the QMP connection is closed") }
        nextID += 1
        let id = "qbackup-\(nextID)"
        var message: [String: Any] = ["execute": command, "id": id]
        if let arguments { message["arguments"] = arguments }
        var data = try QMPJSON.data(message)
        data.append(0x0A)
        try send(data)
        let deadline = Date().addingTimeInterval(timeout ?? self.timeout)
        while true {
            let reply = try readMessage(deadline: deadline, what: "the reply to \(command)")
            if let name = reply["event"] as? String {
                events.append(Event(name: name, data: reply["data"] as? [String: Any] ?? [:]))
                continue
            }
            guard reply["id"] as? String == id else { continue }
            if let error = reply["error"] as? [String: Any] {
                let cls = error["class"] as? String ?? "GenericError"
                let desc = error["desc"] as? String ?? "(no description)"
                throw LiveError(.refused, "QEMU refused \(command): \(desc) (\(cls))", qmpClass: cls)
            }
            return reply["return"] ?? [String: Any]()
        }
    }

    /// An HMP command through `human-monitor-command`; its output, which for commands
    /// such as `qemu-io` is where errors appear (a non-empty string).
    public func hmp(_ commandLine: String) throws -> String {
        try execute("human-monitor-command", ["command-line": commandLine]) as? String ?? ""
    }

    // MARK: - Events

    /// Waits for event `name` whose data satisfies `matching` (queued events first); other
    /// events stay queued. Throws after `timeout`.
    @discardableResult
    public func waitForEvent(_ name: String, timeout: TimeInterval? = nil,
                             matching: ([String: Any]) -> Bool = { _ in true }) throws -> Event {
        if let i = events.firstIndex(where: { $0.name == name && matching($0.data) }) {
            return events.remove(at: i)
        }
        let deadline = Date().addingTimeInterval(timeout ?? self.timeout)
        while true {
            let message = try readMessage(deadline: deadline, what: "event \(name)")
            guard let event = message["event"] as? String else { continue }
            let data = message["data"] as? [String: Any] ?? [:]
            if event == name && matching(data) { return Event(name: event, data: data) }
            events.append(Event(name: event, data: data))
        }
    }

    /// Removes and returns the queued events.
    public func drainEvents() -> [Event] {
        defer { events.removeAll() }
        return events
    }

    // MARK: - Wire

    private func send(_ data: Data) throws {
        try data.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    throw LiveError(.io, "\(path): QMP connection lost while sending: \(String(cString: strerror(errno)))")
                }
                done += n
            }
        }
    }

    /// Reads one JSON object (QMP sends one per line).
    private func readMessage(deadline: Date, what: String) throws -> [String: Any] {
        while true {
            if let newline = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                if line.allSatisfy({ $0 == 0x0D || $0 == 0x20 }) { continue }
                guard let object = (try? QMPJSON.value(Data(line))) as? [String: Any] else {
                    throw LiveError(.invalidFormat, "\(path): QEMU sent a QMP message that is not a JSON object")
                }
                return object
            }
            guard buffer.count <= Self.maxMessage else {
                throw LiveError(.invalidFormat, "\(path): a QMP message is longer than \(Self.maxMessage) bytes")
            }
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else {
                throw LiveError(.io, "\(path): QEMU did not send \(what) within \(Int(timeout)) s")
            }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = Glibc.poll(&pfd, 1, Int32(min(left * 1000, 1000)) + 1)
            if ready < 0 && errno == EINTR { continue }
            guard ready >= 0 else { throw LiveError(.io, "\(path): poll failed: \(String(cString: strerror(errno)))") }
            if ready == 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw LiveError(.io, "\(path): the QMP connection closed while waiting for \(what) (QEMU quit or was killed)")
            }
            buffer.append(contentsOf: chunk[..<n])
        }
    }
}
