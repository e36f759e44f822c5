import QCowImage

/// An error from the bitmap layer, with a stable code (shared with `QCowError`)
/// and the place it is about: file, byte offset, metadata region and bitmap.
public struct BitmapError: CodedError, Sendable {
    /// What kind of failure this is; the CLI maps codes to exit statuses.
    public var code: QCowError.Code
    /// What is wrong, naming the spec field in snake_case.
    public var message: String
    /// The image file the error is about.
    public var path: String?
    /// Byte offset in the file of the structure that is wrong.
    public var offset: UInt64?
    /// The metadata region ("bitmaps extension", "bitmap directory", "bitmap table", "bitmap data").
    public var region: String?
    /// The bitmap the error is about, when there is one.
    public var bitmap: String?

    /// An error with `code` and `message` and as much context as is known.
    public init(_ code: QCowError.Code, _ message: String, path: String? = nil, offset: UInt64? = nil,
                region: String? = nil, bitmap: String? = nil) {
        self.code = code
        self.message = message
        self.path = path
        self.offset = offset
        self.region = region
        self.bitmap = bitmap
    }

    /// Wraps an error of the qcow2 layer, keeping its code and location.
    public init(_ error: QCowError, bitmap: String? = nil) {
        self.init(error.code, error.message, path: error.path, offset: error.offset, region: error.region,
                  bitmap: bitmap)
    }

    public var errorCode: QCowError.Code { code }

    public var description: String {
        var parts: [String] = []
        if let path { parts.append(path) }
        var location = region ?? ""
        if let offset { location += (location.isEmpty ? "" : " ") + "at offset 0x" + String(offset, radix: 16) }
        if !location.isEmpty { parts.append(location) }
        if let bitmap { parts.append("bitmap '\(bitmap)'") }
        parts.append(message)
        return parts.joined(separator: ": ")
    }

    /// The same error, naming `path` if it names no file yet.
    func inFile(_ path: String) -> BitmapError {
        var copy = self
        if copy.path == nil { copy.path = path }
        return copy
    }

    /// The same error, naming `bitmap` if it names none yet.
    func forBitmap(_ name: String) -> BitmapError {
        var copy = self
        if copy.bitmap == nil { copy.bitmap = name }
        return copy
    }
}

/// Runs `body`, turning a `QCowError` into a `BitmapError` so callers see one error type.
@inline(__always)
func bitmapLayer<T>(bitmap: String? = nil, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as QCowError {
        throw BitmapError(error, bitmap: bitmap)
    }
}
