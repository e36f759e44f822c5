import QCowImage
import BitmapStore
