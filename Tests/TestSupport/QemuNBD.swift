import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A read-only `qemu-nbd` export of one image on a unix socket in a temp dir,
/// for reading QEMU's view of a dirty bitmap with `nbdinfo`. Stopped by pid.
public final class QemuNBD {
    /// One extent of `nbdinfo --map`, adjacent extents of the same state merged.
    public struct Extent: Equatable, Sendable, CustomStringConvertible {
        public var start: UInt64
        public var length: UInt64
        public var dirty: Bool
        public init(start: UInt64, length: UInt64, dirty: Bool) {
            self.start = start
            self.length = length
            self.dirty = dirty
        }
        public var description: String { "\(start)+\(length) \(dirty ? "dirty" : "clean")" }
    }

    public let socket: String
    private let process: Process

    /// Starts `qemu-nbd -r -t -B BITMAP -k SOCKET -f qcow2 IMAGE` and waits for the socket.
    public init(image: String, bitmap: String, directory: TempDir) throws {
        socket = directory.file("nbd-\(UUID().uuidString.prefix(6)).sock")
        process = Process()
        process.executableURL = URL(fileURLWithPath: try Tools.which("qemu-nbd"))
        process.arguments = ["-r", "-t", "-B", bitmap, "-k", socket, "-f", "qcow2", image]
        let err = Pipe()
        process.standardError = err
        process.standardOutput = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) {
            if !process.isRunning {
                let message = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                throw Tools.ToolFailure(command: "qemu-nbd " + (process.arguments ?? []).joined(separator: " "),
                                        result: Tools.Result(status: process.terminationStatus, stdout: "", stderr: message,
                                                             stdoutData: Data()))
            }
            guard Date() < deadline else {
                stop()
                throw Tools.ToolFailure(command: "qemu-nbd (socket \(socket) did not appear within 10 s)",
                                        result: Tools.Result(status: -1, stdout: "", stderr: "", stdoutData: Data()))
            }
            usleep(10_000)
        }
    }

    deinit { stop() }

    /// Stops the server by its pid and waits for it.
    public func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
    }

    /// `nbdinfo --json --map=qemu:dirty-bitmap:NAME` against this export, merged.
    public func dirtyMap(bitmap: String) throws -> [Extent] {
        let result = try Tools.qemu("nbdinfo", ["--json", "--map=qemu:dirty-bitmap:\(bitmap)", "nbd+unix:///?socket=\(socket)"])
        guard let items = try JSONSerialization.jsonObject(with: result.stdoutData) as? [[String: Any]] else {
            throw Tools.ToolFailure(command: "nbdinfo (unexpected JSON)", result: result)
        }
        var extents: [Extent] = []
        for item in items {
            guard let offset = (item["offset"] as? NSNumber)?.uint64Value, let length = (item["length"] as? NSNumber)?.uint64Value,
                  let type = (item["type"] as? NSNumber)?.intValue
            else { throw Tools.ToolFailure(command: "nbdinfo (extent without offset/length/type)", result: result) }
            let dirty = type & 1 != 0
            if let last = extents.last, last.dirty == dirty, last.start + last.length == offset {
                extents[extents.count - 1].length += length
            } else {
                extents.append(Extent(start: offset, length: length, dirty: dirty))
            }
        }
        return extents
    }

    /// QEMU's view of `bitmap` in `image`: starts an export, maps it, stops it.
    public static func dirtyMap(image: String, bitmap: String, directory: TempDir) throws -> [Extent] {
        let server = try QemuNBD(image: image, bitmap: bitmap, directory: directory)
        defer { server.stop() }
        return try server.dirtyMap(bitmap: bitmap)
    }
}
