/// An error from the qcow2 engine, with a stable code to branch on and the
/// place in the file where it happened.
public struct QCowError: Error, CustomStringConvertible, Sendable {
    /// What kind of failure this is; the CLI maps codes to exit statuses.
    public enum Code: String, Sendable {
        /// The operating system refused a read, write, sync or open.
        case io
        /// A structure extends past the end of the file or its region.
        case truncated
        /// The file is not a qcow2 image of a version we read.
        case invalidFormat
        /// Metadata contradicts itself or the spec.
        case corrupt
        /// A valid feature that qbackup does not handle.
        case unsupported
        /// Another process holds the image.
        case locked
        /// A value from the caller is out of range.
        case invalidArgument
        /// The operation is not allowed in this state (read-only, corrupt bit...).
        case refused
    }

    public var code: Code
    public var message: String
    /// The file the error is about.
    public var path: String?
    /// Byte offset in the file of the structure that is wrong.
    public var offset: UInt64?
    /// The metadata region (e.g. "header", "L1 table", "refcount block").
    public var region: String?

    public init(_ code: Code, _ message: String, path: String? = nil, offset: UInt64? = nil, region: String? = nil) {
        self.code = code
        self.message = message
        self.path = path
        self.offset = offset
        self.region = region
    }

    public var description: String {
        var parts: [String] = []
        if let path { parts.append(path) }
        var location = ""
        if let region { location = region }
        if let offset { location += (location.isEmpty ? "" : " ") + "at offset 0x" + String(offset, radix: 16) }
        if !location.isEmpty { parts.append(location) }
        parts.append(message)
        return parts.joined(separator: ": ")
    }

    /// The same error, naming `path` if it names no file yet.
    public func inFile(_ path: String) -> QCowError {
        var copy = self
        if copy.path == nil { copy.path = path }
        return copy
    }
}

/// Errors of every qbackup layer (QCowError, BitmapError, ChainError) share
/// these codes, so the CLI maps them to exit statuses in one table.
public protocol CodedError: Error, CustomStringConvertible {
    var errorCode: QCowError.Code { get }
}

extension QCowError: CodedError {
    public var errorCode: Code { code }
}
