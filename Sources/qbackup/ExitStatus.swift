import ArgumentParser
import FoundationEssentials
import Glibc
import QCowImage

/// Exit statuses and the one table that maps library errors to them.
enum ExitStatus {
    static let success: Int32 = 0
    static let failure: Int32 = 1
    static let usage: Int32 = 2
    /// The repository is locked by another qbackup, or the image by QEMU: try again later
    /// (EX_TEMPFAIL of sysexits.h).
    static let busy: Int32 = 75

    /// The one table from library error codes to exit statuses.
    static func status(for code: QCowError.Code) -> Int32 {
        switch code {
        case .locked: busy
        case .io, .truncated, .invalidFormat, .corrupt, .unsupported, .invalidArgument, .refused: failure
        }
    }

    /// Runs a command body; a library error becomes one `qbackup: error:` line on
    /// stderr and the exit status the table gives its code — or `errorStatus` for every
    /// error, for the commands that keep qemu-img's statuses (check 1, compare 2). `json`:
    /// the command's `--output json` is an object (`JSONReport`): it is printed at the end,
    /// with the warnings, and an error is printed as an object on stdout too.
    static func run(json: Bool = false, errorStatus: Int32? = nil, _ body: () throws -> Int32) throws {
        let status: Int32
        defer { StandardOutput.flush() }
        do {
            status = try body()
        } catch let error as ExitCode {
            throw error
        } catch {
            let message: String
            let code: Int32
            switch error {
            case let coded as CodedError: (message, code) = (coded.description, Self.status(for: coded.errorCode))
            case let cocoa as CocoaError: (message, code) = (describe(cocoa), failure)
            default: (message, code) = ("\(error)", failure)
            }
            report(message)
            if json { JSONReport.finish(error: error) }
            throw ExitCode(errorStatus ?? code)
        }
        if json { JSONReport.finish(error: nil) }
        if status != 0 { throw ExitCode(status) }
    }

    /// A Foundation error in words: the file and the system's reason, never
    /// "The operation could not be completed. (NSCocoaErrorDomain error 512.)".
    static func describe(_ error: CocoaError) -> String {
        let reason: String
        if let posix = error.underlying as? POSIXError {
            reason = String(cString: strerror(posix.code.rawValue))
        } else {
            switch error.code {
            case .fileNoSuchFile, .fileReadNoSuchFile: reason = "no such file or folder"
            case .fileReadNoPermission, .fileWriteNoPermission: reason = "permission denied"
            case .fileWriteFileExists: reason = "already exists"
            case .fileWriteOutOfSpace: reason = "no space left on the device"
            case .fileWriteVolumeReadOnly: reason = "the file system is read-only"
            case .propertyListReadCorrupt: reason = "not valid JSON"
            default: reason = "the operation failed (Foundation error \(error.code.rawValue))"
            }
        }
        let path = error.filePath ?? error.url?.path
        return path.map { "\($0): \(reason)" } ?? reason
    }

    static func report(_ message: String) {
        let oneLine = message.replacing("\n", with: " ")
        standardError("qbackup: error: \(oneLine)\n")
    }
}

/// Writes `text` to stderr (fd 2) whole, unbuffered.
func standardError(_ text: String) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let n = bytes.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return }
        bytes = bytes.dropFirst(n)
    }
}

/// One `qbackup: warning:` line on stderr: every warning a command prints goes through here.
func warning(_ message: String) {
    let oneLine = message.replacing("\n", with: " ")
    JSONReport.warnings.append(oneLine)
    standardError("qbackup: warning: \(oneLine)\n")
}

/// Writes to stdout through a 64 KiB buffer (a map or dump of a million extents
/// is one write per 64 KiB, not one per line); `ExitStatus.run` flushes it.
func emit(_ text: String) {
    StandardOutput.buffer.append(contentsOf: text.utf8)
    if StandardOutput.buffer.count >= 64 << 10 { StandardOutput.flush() }
}

enum StandardOutput {
    nonisolated(unsafe) static var buffer: [UInt8] = []

    static func flush() {
        guard !buffer.isEmpty else { return }
        buffer.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = write(STDOUT_FILENO, raw.baseAddress! + done, raw.count - done)
                if n <= 0 { break }
                done += n
            }
        }
        buffer.removeAll(keepingCapacity: true)
    }
}
